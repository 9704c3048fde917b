"""Two processes on loopback, 4 simulated CPU devices each, run 4 SFT steps of the tiny config on
a (2 data, 2 fsdp, 2 tensor) mesh through `ibis-jax sft --coordinator ...`: the same data order,
losses and exported HF weights as one process with 8 devices."""

import glob
import os
import re
import signal
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import write_dataset
from multiprocess import ROOT, finish, launch, metrics, start

SFT = ["sft", "--config", os.path.join(ROOT, "configs", "tiny_cpu.py"), "--no-progress"]
OVERRIDES = ["image_size=56", "seq_buckets=256", "drop_too_long=false", "batch_size=8", "max_steps=4",
             "mesh_shape=2,2,2", "lr=1e-3", "warmup_frac=0", "checkpoint_every=1000", "log_every=1"]


def _weights(directory):
    return load_file(os.path.join(directory, "model.safetensors"))


def test_two_processes_equal_one(tmp_path):
    data = write_dataset(str(tmp_path / "data"), records=4)
    t0 = time.perf_counter()
    one = str(tmp_path / "one")
    launch([*SFT, "--data", data, "--workdir", one, *OVERRIDES], 1, 8, str(tmp_path / "logs_one"))
    t1 = time.perf_counter()
    two = str(tmp_path / "two")
    tok = os.path.join(one, "tokenizer")  # the same tokenizer (process 0 would fit the same one)
    logs = launch([*SFT, "--data", data, "--workdir", two, *OVERRIDES, f"tokenizer_dir={tok}"], 2, 4,
                  str(tmp_path / "logs_two"))
    t2 = time.perf_counter()
    print(f"1 process x 8 devices: {t1 - t0:.1f} s; 2 processes x 4 devices: {t2 - t1:.1f} s")
    assert "step 4/4" in logs[0] and "step 4/4" not in logs[1]  # only process 0 reports
    assert " INFO " not in logs[1]  # the others log errors only
    m1, m2 = metrics(one), metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1, 2, 3, 4]
    assert [r["data_fingerprint"] for r in m1] == [r["data_fingerprint"] for r in m2]  # same global batches
    assert len({r["data_fingerprint"] for r in m1}) == 4
    assert m1[-1]["loss"] < m1[0]["loss"] - 0.05  # the weights really move
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) < 1e-5 * a["loss"], (a["loss"], b["loss"])
    w1, w2 = _weights(os.path.join(one, "hf")), _weights(os.path.join(two, "hf"))
    assert sorted(w1) == sorted(w2) and len(w1) > 50
    diffs = {k: float(np.abs(w1[k] - w2[k]).max()) for k in w1}
    worst = max(diffs, key=diffs.get)
    print(f"max |w_1proc - w_2proc| = {diffs[worst]:.2e} ({worst})")
    # 4 Adam steps of lr 1e-3 move weights by ~4e-3; fp32 reduction order differs between the
    # all-reduces of one and two processes (Adam magnifies that on near-zero gradients).
    assert diffs[worst] < 5e-5


@pytest.mark.slow  # four multi-process launches: minutes on 2 cores
def test_two_processes_sigterm_resume_is_bit_exact(tmp_path):
    """SIGTERM to process 1 only, after step 2: both processes stop at the same step (the flag is
    agreed on), checkpoint collectively; the rerun resumes to step 4 bit for bit."""
    data = write_dataset(str(tmp_path / "data"), records=4)
    tok = str(tmp_path / "one" / "tokenizer")
    launch([*SFT, "--data", data, "--workdir", str(tmp_path / "one"), *OVERRIDES, "max_steps=1"], 1, 8,
           str(tmp_path / "logs_tok"))  # fits the tokenizer once
    args = [*OVERRIDES, f"tokenizer_dir={tok}"]
    full = str(tmp_path / "full")
    launch([*SFT, "--data", data, "--workdir", full, *args], 2, 4, str(tmp_path / "logs_full"))
    resumed = str(tmp_path / "resumed")
    procs, logs = start([*SFT, "--data", data, "--workdir", resumed, *args], 2, 4, str(tmp_path / "logs_a"))
    deadline = time.time() + 600
    while time.time() < deadline:
        path = os.path.join(resumed, "metrics.jsonl")
        # metrics are written a step late: step 1's row appears while step 2 runs
        if os.path.exists(path) and any(r["step"] >= 1 for r in metrics(resumed)):
            procs[1][0].send_signal(signal.SIGTERM)
            break
        if any(p.poll() is not None for p, _ in procs):
            break
        time.sleep(0.05)
    logs_a = finish(procs, logs)
    stopped = max(r["step"] for r in metrics(resumed))
    assert 2 <= stopped < 4 and "not finished" in logs_a[0], logs_a[0][-2000:]
    launch([*SFT, "--data", data, "--workdir", resumed, *args], 2, 4, str(tmp_path / "logs_b"))
    a, b = _weights(os.path.join(full, "hf")), _weights(os.path.join(resumed, "hf"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    fa = {r["step"]: r["data_fingerprint"] for r in metrics(full)}
    fb = {r["step"]: r["data_fingerprint"] for r in metrics(resumed)}
    assert fa == fb and sorted(fa) == [1, 2, 3, 4]


@pytest.mark.slow  # two multi-process launches: minutes on 2 cores
def test_two_processes_sigkill_during_a_checkpoint_resume_from_the_last_complete_one(tmp_path):
    """Both processes SIGKILLed while the checkpoint of step >= 2 is being written (Orbax's
    temporary folder is there): the rerun resumes from the last complete step and finishes."""
    data = write_dataset(str(tmp_path / "data"), records=4)
    run = str(tmp_path / "run")
    args = [*SFT, "--data", data, "--workdir", run, *OVERRIDES, "checkpoint_every=1"]
    procs, logs = start(args, 2, 4, str(tmp_path / "logs_a"))
    ckpts = os.path.join(run, "checkpoints")
    writing = complete = None
    try:
        deadline = time.time() + 600
        while time.time() < deadline and all(p.poll() is None for p, _ in procs):
            tmp = [int(m.group(1)) for d in glob.glob(os.path.join(ckpts, "*.orbax-checkpoint-tmp*"))
                   if (m := re.match(r"(\d+)\.orbax", os.path.basename(d)))]
            if tmp and max(tmp) >= 2:
                for p, _ in procs:
                    p.send_signal(signal.SIGKILL)
                writing = max(tmp)
                break
            time.sleep(0.02)
    finally:
        for p, f in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=60)
            f.close()
    assert writing is not None, "no checkpoint was being written before the run ended:\n" + open(logs[0]).read()[-3000:]
    complete = max(int(d) for d in os.listdir(ckpts) if d.isdigit())  # finalised steps only have plain names
    assert complete < writing, (complete, writing)
    print(f"killed while writing step {writing}; last complete step {complete}")
    logs_b = launch(args, 2, 4, str(tmp_path / "logs_b"))
    assert f"resumed from step {complete}" in logs_b[0], logs_b[0][-3000:]
    assert "step 4/4" in logs_b[0]
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]  # one row per step across the kill
    assert os.path.exists(os.path.join(run, "hf", "model.safetensors"))
    assert max(int(d) for d in os.listdir(ckpts) if d.isdigit()) == 4
