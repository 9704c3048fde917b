"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8: one SFT step on
one device and on a (2 data, 2 fsdp, 2 tensor) mesh; prints the differences as JSON."""

import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from helpers import make_config, write_dataset  # noqa: E402

from ibis_jax.train.sft import train  # noqa: E402


def main(tmp: str) -> None:
    assert len(jax.devices()) == 8, jax.devices()
    data = write_dataset(os.path.join(tmp, "data"))
    tok = os.path.join(tmp, "tok")
    out = {}
    for name, shape, devices in [("one", (1, 1, 1), jax.devices()[:1]), ("mesh", (2, 2, 2), None)]:
        cfg = make_config(mesh_shape=shape, tokenizer_dir=tok if name == "mesh" else None)
        res = train(cfg, data, os.path.join(tmp, name), devices=devices)
        out[name] = (res["metrics"], res["model_def"].all_params(*jax.device_get((res["state"].params, res["state"].frozen))))
        if name == "one":
            tok = res["tokenizer_dir"]
        shardings = {str(x.sharding.spec) for x in jax.tree.leaves(res["state"].params)}
        out[name + "_specs"] = sorted(shardings)
    (m1, p1), (m2, p2) = out["one"], out["mesh"]
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), p1, p2))
    moved = jax.tree.leaves(jax.tree.map(lambda a: float(np.max(np.abs(np.asarray(a)))), p1))
    print("RESULT " + json.dumps({
        "loss_one": m1["loss"], "loss_mesh": m2["loss"], "grad_norm_one": m1["grad_norm"],
        "grad_norm_mesh": m2["grad_norm"], "max_param_diff": max(diffs), "num_params": len(diffs),
        "mesh_specs": out["mesh_specs"], "fingerprints": [m1["data_fingerprint"], m2["data_fingerprint"]],
        "max_param": max(moved),
    }))


if __name__ == "__main__":
    main(sys.argv[1])
