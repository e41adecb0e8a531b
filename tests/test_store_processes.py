"""The activation store across processes: `kill -9` at random moments and in the middle of a batch's writes, a
file-size limit that makes writes fail like a full disk, flat memory over 10x more tokens, and a two-process
torchrun extraction joined into one store. Each extraction runs in its own Python process."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import neuronmap as nm

pytestmark = pytest.mark.slow

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.hook_resid_post"]
CHILD = r"""
import json, os, resource, signal, sys
import torch
import neuronmap as nm
from neuronmap.store import layout

mode, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
texts = [f"when mary and john went to the store {' '.join(['the cat sat'] * (i % 5))} {i}" for i in range(n)]
if mode == "kill-mid-batch":  # SIGKILL itself after writing some of one batch's activation datasets
    after, written, extend = int(sys.argv[4]), [0], layout._extend
    def killing_extend(dataset, start, values):
        extend(dataset, start, values)
        if dataset.name.startswith("/activations/"):
            written[0] += 1
            if written[0] == after:
                os.kill(os.getpid(), signal.SIGKILL)
    layout._extend = killing_extend
if mode == "failing-write":  # the disk fails in the middle of a batch, after some of its datasets are written
    after, written, extend = int(sys.argv[4]), [0], layout._extend
    def failing_extend(dataset, start, values):
        written[0] += 1
        if written[0] == after:
            raise OSError(28, "No space left on device")
        extend(dataset, start, values)
    layout._extend = failing_extend
if mode == "file-size-limit":  # writes past the limit fail with EFBIG, as on a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[4]),) * 2)
if mode == "rss":
    with open(out + ".txt", "w") as handle:
        for i in range(n):
            handle.write(" ".join(["when mary and john went to the store"] * 6) + f" {i}\n")
    texts = out + ".txt"
hooks = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.hook_resid_post"]
try:
    store = nm.extract("ioi", texts, hooks, out, batch_size=4, dtype=torch.float32 if mode == "rss" else torch.float16,
                       progress=False)
except nm.StoreError as error:
    print(json.dumps({"error": str(error)}))
    sys.exit(1)
# VmHWM is this process image's own peak (ru_maxrss would carry over the forking parent's through exec)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"rows": len(store), "peak_kib": peak}))
"""


def run_child(tmp_path, *arguments, check=True, **kwargs) -> subprocess.Popen | dict:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    command = [sys.executable, str(script), *map(str, arguments)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not check:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clean")
    started = time.perf_counter()
    run_child(folder, "plain", folder / "clean.h5", 1500)
    store = nm.open_store(folder / "clean.h5")
    return store, time.perf_counter() - started


def assert_prefix_of(store, clean) -> None:
    """The store's committed rows are exactly the first rows of the clean run."""
    n = len(store)
    for hook in HOOKS:
        assert torch.equal(store[hook][:], clean[hook][:n]), hook
    assert torch.equal(store.tokens, clean.tokens[:n])
    documents = store.documents[:-1]
    assert torch.equal(documents, clean.documents[: len(documents)])


def resume_and_compare(tmp_path, path, clean) -> None:
    run_child(tmp_path, "plain", path, 1500)
    resumed = nm.open_store(path)
    assert resumed.status == "complete" and len(resumed) == len(clean)
    assert_prefix_of(resumed, clean)
    assert torch.equal(resumed.documents, clean.documents)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_kill_9_at_a_random_moment_leaves_the_committed_rows_and_resumes(tmp_path, clean, seed):
    clean, seconds = clean
    path = tmp_path / "a.h5"
    child = run_child(tmp_path, "plain", path, 1500, check=False)
    while not path.exists() and child.poll() is None:
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0.05, 0.6) * seconds)
    child.send_signal(signal.SIGKILL)
    child.wait()
    store = nm.open_store(path)
    assert store.status in ("interrupted", "complete")
    assert_prefix_of(store, clean)
    store.close()
    resume_and_compare(tmp_path, path, clean)


@pytest.mark.parametrize("after", [2, 61])
def test_kill_9_in_the_middle_of_a_batch_commits_none_of_it(tmp_path, clean, after):
    clean, _ = clean
    path = tmp_path / "a.h5"
    child = run_child(tmp_path, "kill-mid-batch", path, 1500, after, check=False)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    store = nm.open_store(path)
    assert store.status == "interrupted" and "interrupted" in repr(store)
    assert store.progress.windows == 4 * ((after - 1) // len(HOOKS))  # only the batches before the killed one
    assert_prefix_of(store, clean)
    store.close()
    resume_and_compare(tmp_path, path, clean)


@pytest.mark.parametrize("mode", ["file-size-limit", "failing-write"])
def test_a_full_or_failing_disk_keeps_the_committed_batches_and_says_so(tmp_path, clean, mode):
    clean, _ = clean
    path = tmp_path / "a.h5"
    argument = os.path.getsize(clean.path) // 2 if mode == "file-size-limit" else 200
    child = run_child(tmp_path, mode, path, 1500, argument, check=False, text=True)
    out, err = child.communicate(timeout=600)
    assert child.returncode == 1, err[-2000:]
    message = json.loads(out.strip().splitlines()[-1])["error"]
    assert message.startswith("writing the store failed") and "stays readable" in message and "resume" in message
    store = nm.open_store(path)
    assert 0 < len(store) < len(clean) and f"{len(store):,} rows" in message
    assert_prefix_of(store, clean)
    store.close()
    resume_and_compare(tmp_path, path, clean)


def test_memory_stays_flat_over_ten_times_more_tokens(tmp_path):
    small = run_child(tmp_path, "rss", tmp_path / "small.h5", 400)
    large = run_child(tmp_path, "rss", tmp_path / "large.h5", 4000)
    assert large["rows"] > 9.5 * small["rows"]
    stored = os.path.getsize(tmp_path / "large.h5")
    growth = large["peak_kib"] / small["peak_kib"] - 1
    assert stored > 0.2 * small["peak_kib"] * 1024  # holding the rows in memory would grow the peak by twice the bound
    assert growth < 0.10, (small, large, stored)


def test_two_torchrun_processes_give_the_single_process_store(tmp_path):
    source = tmp_path / "docs.jsonl"
    with open(source, "w") as handle:
        for i in range(48):
            handle.write(json.dumps({"text": f"when mary and john went to the store {'the cat ' * (i % 7)}{i}"}) + "\n")
    common = ["extract", "ioi", "--hooks", "blocks.*.hook_resid_post", "--hooks", "blocks.0.attn.hook_v", "--input",
              str(source), "--batch-size", "4", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "-m", "neuronmap", *common, "--out", str(tmp_path / "one.h5")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    joined = subprocess.run([sys.executable, "-m", "neuronmap", *common, "--out", str(tmp_path / "two.h5"),
                             "--processes", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert "ActivationStore('two.h5'" in joined.stdout
    one, two = nm.open_store(tmp_path / "one.h5"), nm.open_store(tmp_path / "two.h5")
    assert sorted(p.name for p in (tmp_path / "two.h5.shards").iterdir()) == [
        "rank-00000-of-00002.h5", "rank-00001-of-00002.h5"]
    assert two.metadata["shards"] == ["two.h5.shards/rank-00000-of-00002.h5", "two.h5.shards/rank-00001-of-00002.h5"]
    assert len(one) == len(two) and one.hooks == two.hooks
    for hook in one.hooks:
        assert torch.equal(one[hook][:], two[hook][:]), hook
        assert torch.equal(one[hook][[7, 3, len(one) - 1]], two[hook][[7, 3, len(one) - 1]])
    assert torch.equal(one.tokens, two.tokens) and torch.equal(one.documents, two.documents)
    assert one.locate(slice(None)) == two.locate(slice(None))
    batches = [list(store.batches("blocks.1.hook_resid_post", 64, seed=5)) for store in (one, two)]
    assert all(torch.equal(a, b) for a, b in zip(*batches))
    assert "2 shards" in two._repr_html_()
    two.close()
    (tmp_path / "two.h5.shards" / "rank-00001-of-00002.h5").unlink()
    with pytest.raises(nm.StoreError, match="shards that are missing: two.h5.shards/rank-00001-of-00002.h5"):
        nm.open_store(tmp_path / "two.h5")
