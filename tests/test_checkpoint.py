"""Fault injection for dpo_lit.checkpoint: unusable output folders, damaged checkpoints, a kill
in the middle of a save, metrics logs trimmed on resume, folder modes under the user's umask."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import dpo_lit.checkpoint as C
from dpo_lit.checkpoint import (MANIFEST, CheckpointError, CheckpointWarning, OutputDirError,
                                atomic_save_dir, check_output_dir, clean_partial_saves,
                                list_checkpoints, make_dir, resolve_resume, rotate_checkpoints,
                                trim_jsonl, verify_checkpoint, write_manifest)

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NOBODY = 65534


# ----- helpers -----
@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def snapshot(folder):
    "Every file under `folder` -> sha256 of its bytes (computed here, independently of the module)."
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def save_ckpt(out, step, seed=None):
    "A checkpoint like the trainer's: model.pt, trainer_state.pt, trainer_state.json."
    g = torch.Generator().manual_seed(step if seed is None else seed)
    model = {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}
    state = {"step": step, "optimizer": {"exp_avg": torch.randn(64, 32, generator=g)}}
    def write(tmp):
        torch.save(model, tmp / "model.pt")
        torch.save(state, tmp / "trainer_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    return atomic_save_dir(Path(out) / f"checkpoint-{step}", write), model


def one_line_error(fn, cls):
    with pytest.raises(cls) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return info.value, msg


# ----- check_output_dir -----
def test_output_dir_is_a_file(tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    e, msg = one_line_error(lambda: check_output_dir(f), OutputDirError)
    assert msg == f"output_dir {f}: exists and is a file, not a folder"
    assert isinstance(e, OSError) and e.path == f
    assert f.read_text() == "x"


def test_output_dir_below_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    _, msg = one_line_error(lambda: check_output_dir(f / "a" / "b"), OutputDirError)
    assert msg == f"output_dir {f}/a/b: cannot be created: {f} is a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_output_dir_below_a_broken_link(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    _, msg = one_line_error(lambda: check_output_dir(tmp_path / "link" / "run"), OutputDirError)
    link = tmp_path / "link"
    assert msg == f"output_dir {link}/run: cannot be created: {link} is a broken link"


def test_output_dir_created_and_probe_removed(tmp_path):
    out = check_output_dir(tmp_path / "x" / "y")
    assert out == tmp_path / "x" / "y" and out.is_dir() and list(out.iterdir()) == []
    (out / "keep.txt").write_text("k")
    assert check_output_dir(str(out)) == out                # an existing folder is fine, untouched
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_errors_pickle_and_subclass():
    for e in (OutputDirError("/a", "read-only file system"), CheckpointError("/b/ck", "bad")):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e) and back.path == e.path
    assert str(OutputDirError("/a", "p")) == "output_dir /a: p"
    assert str(CheckpointError("/b/ck", "bad")) == "/b/ck: bad"
    assert issubclass(OutputDirError, OSError) and issubclass(CheckpointError, RuntimeError)
    assert issubclass(CheckpointWarning, UserWarning)


@pytest.fixture
def public_dir():
    "A folder under /tmp that another user can reach (pytest's tmp_path is 0700)."
    d = Path(tempfile.mkdtemp(prefix="dpo-lit-perm-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def check_as_nobody(path):
    "`check_output_dir(path)` in a forked child without root privileges: its error message or ''."
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: drop to user nobody, report, exit
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                check_output_dir(path)
                msg = ""
            except OutputDirError as e:
                msg = str(e)
            os.write(w, msg.encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    assert os.waitpid(pid, 0)[1] == 0
    return msg


@pytest.mark.parametrize("sub", ["", "new/deeper"])
def test_output_dir_without_permission(public_dir, sub):
    "A folder the process may not write (root: checked as user nobody; others: a chmod 555 folder)."
    locked = make_dir(public_dir / "locked")
    os.chmod(locked, 0o555)
    target = locked / sub if sub else locked
    problem = "cannot be created: permission denied" if sub else "not writable: permission denied"
    if IS_ROOT:
        assert check_output_dir(locked) == locked             # root may write here: no false alarm
        msg = check_as_nobody(target)
    else:
        _, msg = one_line_error(lambda: check_output_dir(target), OutputDirError)
    assert msg == f"output_dir {target}: {problem}"
    assert sorted(locked.iterdir()) == []                     # no probe, no half-made folder


@pytest.fixture
def readonly_mount(tmp_path):
    "A real read-only file system (a tmpfs mounted ro, holding one folder), else skip."
    mnt = tmp_path / "ro"
    src = tmp_path / "src"
    make_dir(src / "existing")
    mnt.mkdir()
    if not IS_ROOT or shutil.which("mount") is None:
        pytest.skip("mounting a read-only file system needs root")
    r = subprocess.run(["mount", "--bind", str(src), str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"mount failed: {r.stderr.decode()[-200:]}")
    try:
        r = subprocess.run(["mount", "-o", "remount,ro,bind", str(mnt)], capture_output=True)
        if r.returncode:
            pytest.skip(f"read-only remount failed: {r.stderr.decode()[-200:]}")
        assert os.statvfs(mnt).f_flag & os.ST_RDONLY
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_output_dir_on_read_only_file_system(readonly_mount, monkeypatch):
    existing = readonly_mount / "existing"
    _, msg = one_line_error(lambda: check_output_dir(existing), OutputDirError)
    assert msg == f"output_dir {existing}: read-only file system"
    new = readonly_mount / "run" / "one"
    _, msg = one_line_error(lambda: check_output_dir(new), OutputDirError)
    assert msg == f"output_dir {new}: cannot be created: read-only file system"
    # without the statvfs flag the probe file alone still finds it (e.g. an OS without statvfs)
    monkeypatch.delattr(os, "statvfs")
    _, msg = one_line_error(lambda: check_output_dir(existing), OutputDirError)
    assert msg == f"output_dir {existing}: not writable: read-only file system"


# ----- the manifest and verify_checkpoint -----
def test_manifest_matches_independent_digests(tmp_path):
    def write(tmp):
        torch.save({"w": torch.arange(10.0)}, tmp / "model.pt")
        make_dir(tmp / "tok" / "sub")
        (tmp / "tok" / "sub" / "v.txt").write_text("abc")
        (tmp / "empty").write_bytes(b"")
    ck = atomic_save_dir(tmp_path / "ck", write)
    m = json.loads((ck / MANIFEST).read_text())
    files = {k: v["sha256"] for k, v in m["files"].items()}
    assert files == {k: v for k, v in snapshot(ck).items() if k != MANIFEST}
    assert {k: v["size"] for k, v in m["files"].items()} == {
        k: (ck / k).stat().st_size for k in files}
    assert m["files"]["empty"]["sha256"] == hashlib.sha256(b"").hexdigest()
    assert verify_checkpoint(ck) is None
    assert write_manifest(ck) == m["files"]                  # rewriting gives the same table


def damage_cases(ck):
    "name -> (function harming a copy, words the problem must contain)."
    model = (ck / "model.pt").read_bytes()
    w = torch.load(ck / "model.pt", weights_only=True)["w"]
    at = model.find(w.numpy().tobytes()) + 4 * 100
    assert at > 4 * 100
    def overwrite16(p):                       # four other finite float32 values, same size
        with open(p / "model.pt", "r+b") as f:
            f.seek(at)
            f.write(np.array([0.5, -0.25, 3.0, 7.0], np.float32).tobytes())
    def corrupt_table(p):                     # valid JSON, one digest edited
        m = json.loads((p / MANIFEST).read_text())
        d = m["files"]["model.pt"]["sha256"]
        m["files"]["model.pt"]["sha256"] = ("0" if d[0] != "0" else "1") + d[1:]
        (p / MANIFEST).write_text(json.dumps(m))
    return {
        "truncated model": (lambda p: os.truncate(p / "model.pt", len(model) // 2),
                            f"model.pt has {len(model) // 2} bytes, the manifest says "
                            f"{len(model)}"),
        "truncated state": (lambda p: os.truncate(p / "trainer_state.pt", 10),
                            "trainer_state.pt has 10 bytes"),
        "16 bytes overwritten": (overwrite16, "model.pt does not match its sha256"),
        "missing file": (lambda p: os.remove(p / "trainer_state.pt"),
                         "trainer_state.pt is missing"),
        "missing manifest": (lambda p: os.remove(p / MANIFEST), "manifest.json is missing"),
        "garbage manifest": (lambda p: (p / MANIFEST).write_bytes(b"\xff\x00{"),
                             "manifest.json is unreadable"),
        "truncated manifest": (lambda p: os.truncate(p / MANIFEST, 30),
                               "manifest.json is unreadable"),
        "edited manifest": (corrupt_table, "manifest.json is corrupt"),
        "manifest not a table": (lambda p: (p / MANIFEST).write_text("[1, 2]"),
                                 "manifest.json is corrupt"),
        "grown file": (lambda p: open(p / "trainer_state.json", "a").write(" "),
                       "trainer_state.json has"),
    }


def test_every_damage_is_caught(tmp_path):
    ck, model = save_ckpt(tmp_path / "good", 1)
    for name, (harm, words) in damage_cases(ck).items():
        copy = tmp_path / name.replace(" ", "_")
        shutil.copytree(ck, copy)
        assert verify_checkpoint(copy) is None
        harm(copy)
        problem = verify_checkpoint(copy)
        assert problem is not None and words in problem and "\n" not in problem, (name, problem)
    # the overwritten copy loads without error, with finite, wrong weights: only the digest knows
    w = torch.load(tmp_path / "16_bytes_overwritten" / "model.pt", weights_only=True)["w"]
    assert torch.isfinite(w).all() and (w != model["w"]).sum() == 4
    assert verify_checkpoint(tmp_path / "nowhere") == "does not exist"


def test_any_single_byte_change_is_caught(tmp_path):
    ck, _ = save_ckpt(tmp_path, 3)
    rng = random.Random(0)
    for _ in range(40):
        name = rng.choice(["model.pt", "trainer_state.pt", "trainer_state.json"])
        data = bytearray((ck / name).read_bytes())
        i = rng.randrange(len(data))
        old = data[i]
        data[i] = (old + rng.randrange(1, 256)) % 256
        (ck / name).write_bytes(bytes(data))
        assert verify_checkpoint(ck) == f"{name} does not match its sha256: same size, other bytes"
        data[i] = old
        (ck / name).write_bytes(bytes(data))
        assert verify_checkpoint(ck) is None


def test_manifest_is_reserved_and_nothing_left(tmp_path):
    with pytest.raises(ValueError, match="manifest.json"):
        atomic_save_dir(tmp_path / "ck", lambda d: (d / MANIFEST).write_text("{}"))
    assert list(tmp_path.iterdir()) == []


def test_manifest_written_last_before_rename(tmp_path, monkeypatch):
    "Order of the renames: the manifest goes in place after every file, then the folder is renamed."
    events, real = [], os.replace
    def spy(a, b):
        siblings = sorted(p.name for p in Path(a).parent.iterdir())
        events.append((Path(a).name, Path(b).name, siblings))
        return real(a, b)
    monkeypatch.setattr(C.os, "replace", spy)
    atomic_save_dir(tmp_path / "ck", lambda d: (d / "a.bin").write_bytes(b"1"))
    (man_src, man_dst, siblings), (dir_src, dir_dst, _) = events
    assert man_dst == MANIFEST and man_src.startswith(".") and "a.bin" in siblings
    assert dir_src.startswith(".tmp-ck-") and dir_dst == "ck"


def test_atomic_save_onto_a_file_refused(tmp_path):
    (tmp_path / "final").write_text("a file")
    with pytest.raises(FileExistsError, match="final is a file, not a folder"):
        atomic_save_dir(tmp_path / "final", lambda d: (d / "w").write_text("w"))
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    assert (tmp_path / "final").read_text() == "a file"


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_an_existing_folder(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(C, "_exchange", lambda a, b: False)
    atomic_save_dir(tmp_path / "final", lambda d: (d / "v").write_text("1"))
    atomic_save_dir(tmp_path / "final", lambda d: (d / "w").write_text("2"))
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == [MANIFEST, "w"]
    assert verify_checkpoint(tmp_path / "final") is None
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_failed_replacement_puts_the_old_folder_back(tmp_path, monkeypatch):
    "Without an atomic exchange, a rename that fails after the old folder moved aside undoes it."
    atomic_save_dir(tmp_path / "final", lambda d: (d / "v").write_text("1"))
    before = snapshot(tmp_path / "final")
    monkeypatch.setattr(C, "_exchange", lambda a, b: False)
    real = os.replace
    def replace(a, b):
        if Path(a).name.startswith(".tmp-final-") and Path(b).name == "final":
            raise OSError(5, "Input/output error")
        return real(a, b)
    monkeypatch.setattr(C.os, "replace", replace)
    with pytest.raises(OSError, match="Input/output"):
        atomic_save_dir(tmp_path / "final", lambda d: (d / "w").write_text("2"))
    assert snapshot(tmp_path / "final") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


# ----- resolve_resume -----
def make_run(out, steps):
    return {s: save_ckpt(out, s)[0] for s in steps}


def resume_with_warnings(spec, out):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = resolve_resume(spec, out)
    return p, [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]


def test_resume_falls_back_over_each_damage(tmp_path):
    ck, _ = save_ckpt(tmp_path / "proto", 9)
    for name, (harm, words) in damage_cases(ck).items():
        out = tmp_path / name.replace(" ", "_")
        cks = make_run(out, [2, 4, 6])
        before = snapshot(cks[4])
        harm(cks[6])
        p, said = resume_with_warnings("latest", out)
        assert p == cks[4], name
        assert len(said) == 1 and said[0].startswith(f"{cks[6]} is damaged (") and words in said[0]
        assert said[0].endswith("; resuming from checkpoint-4 instead")
        assert snapshot(cks[4]) == before


def test_resume_skips_several_damaged(tmp_path):
    cks = make_run(tmp_path, [1, 2, 3, 10])
    os.remove(cks[10] / "model.pt")
    os.truncate(cks[3] / "model.pt", 5)
    p, said = resume_with_warnings(True, tmp_path)
    assert p == cks[2]
    assert [s.split(" is damaged")[0] for s in said] == [str(cks[10]), str(cks[3])]
    p, said = resume_with_warnings(tmp_path, None)      # a folder of checkpoints: the same rule
    assert p == cks[2] and len(said) == 2


def test_resume_none_intact_is_one_error(tmp_path):
    cks = make_run(tmp_path, [1, 2])
    os.remove(cks[1] / MANIFEST)
    os.truncate(cks[2] / "trainer_state.pt", 0)
    e, msg = one_line_error(lambda: resolve_resume("latest", tmp_path), CheckpointError)
    assert msg.startswith(f"{tmp_path}: no intact checkpoint to resume from: checkpoint-2 (")
    assert "checkpoint-1 (manifest.json is missing)" in msg and e.path == tmp_path
    _, msg = one_line_error(lambda: resolve_resume("latest", tmp_path / "empty"), CheckpointError)
    assert msg == f"{tmp_path}/empty: no checkpoint-<step> folder to resume from"


def test_resume_explicit_path(tmp_path):
    cks = make_run(tmp_path, [1, 2])
    assert resolve_resume(cks[1], tmp_path) == cks[1]
    assert resolve_resume(str(cks[2])) == cks[2]
    os.truncate(cks[1] / "model.pt", 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # no fallback for a chosen checkpoint
        _, msg = one_line_error(lambda: resolve_resume(cks[1], tmp_path), CheckpointError)
    assert msg.startswith(f"{cks[1]}: model.pt has 3 bytes, the manifest says ")
    _, msg = one_line_error(lambda: resolve_resume(tmp_path / "nope"), CheckpointError)
    assert msg == f"{tmp_path}/nope: does not exist"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.jsonl").write_text("")
    _, msg = one_line_error(lambda: resolve_resume(tmp_path / "other"), CheckpointError)
    assert msg == (f"{tmp_path}/other: is neither a checkpoint (it has no manifest.json) nor a "
                   "folder of checkpoint-<step> folders")
    os.remove(cks[2] / MANIFEST)                             # a checkpoint by its name
    _, msg = one_line_error(lambda: resolve_resume(cks[2]), CheckpointError)
    assert msg == f"{cks[2]}: manifest.json is missing"
    assert resolve_resume(None, tmp_path) is None and resolve_resume(False, tmp_path) is None
    with pytest.raises(ValueError, match="output_dir"):
        resolve_resume("latest", None)


def test_rotation_keeps_newest_and_removes_whole(tmp_path):
    cks = make_run(tmp_path, [5, 1, 20, 3])
    assert rotate_checkpoints(tmp_path, 2) == [cks[1], cks[3]]
    assert list_checkpoints(tmp_path) == [cks[5], cks[20]]
    assert rotate_checkpoints(tmp_path, None) == [] and rotate_checkpoints(tmp_path, 0) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20", "checkpoint-5"]


def test_rotation_after_a_fallback_keeps_the_fresh_checkpoint(tmp_path):
    "Resumed at 4 over a damaged checkpoint-6, saved 5: a limit of 1 keeps 5, never the damaged 6."
    cks = make_run(tmp_path, [2, 4, 6])
    os.truncate(cks[6] / "model.pt", 1)
    with pytest.warns(CheckpointWarning, match="checkpoint-6 is damaged"):
        assert resolve_resume("latest", tmp_path) == cks[4]
    cks[5] = save_ckpt(tmp_path, 5)[0]
    assert rotate_checkpoints(tmp_path, 1, keep=str(cks[5])) == [cks[2], cks[4], cks[6]]
    assert list_checkpoints(tmp_path) == [cks[5]] and resolve_resume(True, tmp_path) == cks[5]
    cks = make_run(tmp_path / "b", [2, 4, 6, 5])
    assert rotate_checkpoints(tmp_path / "b", 3, keep=cks[5]) == [cks[6]]
    assert rotate_checkpoints(tmp_path / "b", 1) == [cks[2], cks[4]]   # no keep: by step
    with pytest.raises(ValueError, match="final is not a checkpoint-<step>"):
        rotate_checkpoints(tmp_path, 1, keep=tmp_path / "final")


# ----- a kill in the middle of a save -----
KILL_CHILD = textwrap.dedent("""
    import os, shutil, sys
    from pathlib import Path
    import dpo_lit.checkpoint as C
    out, phase, step, mb = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    def stop_here(word="ready"):
        "Tell the parent where we are, then wait to be killed (no timing involved)."
        print(word, flush=True)
        sys.stdin.read()
        sys.exit("the parent should have killed this process")

    real_replace, real_exchange, real_replace_dir = os.replace, C._exchange, C._replace_dir
    real_rmtree = shutil.rmtree
    def replace(a, b):
        if phase == "manifest" and Path(b).name == C.MANIFEST: stop_here()
        if phase == "rename" and Path(b).name == f"checkpoint-{step}": stop_here()
        real_replace(a, b)
        if phase == "aside" and Path(b).parent.name.startswith(".old-"): stop_here()
    def exchange(a, b):
        if phase == "aside": return False
        ok = real_exchange(a, b)
        if phase == "swapped": stop_here("ready" if ok else "unsupported")
        return ok
    def replace_dir(a, b):
        if phase == "before swap": stop_here()
        return real_replace_dir(a, b)
    def rmtree(p, *args, **kw):
        if phase == "rotate":
            first = next(f for f in sorted(Path(p).rglob("*")) if f.is_file())
            first.unlink()
            stop_here()
        return real_rmtree(p, *args, **kw)
    C.os.replace, C._exchange, C._replace_dir = replace, exchange, replace_dir
    C.shutil.rmtree = rmtree

    def write(tmp):
        with open(tmp / "model.pt", "wb") as f:
            for i in range(mb):
                f.write(bytes([i % 251]) * (1 << 20))
                if phase == "write" and i == mb // 2:
                    f.flush()
                    stop_here()
        (tmp / "trainer_state.json").write_text('{"step": %d}' % step)
    if phase == "rotate":
        C.rotate_checkpoints(out, 1)
    else:
        C.atomic_save_dir(out / f"checkpoint-{step}", write)
    print("finished", flush=True)
""")


def kill_mid_save(out, phase, step, mb=32):
    "Start a child saving checkpoint-`step` (`mb` MiB), SIGKILL it at `phase`."
    args = [sys.executable, "-c", KILL_CHILD, str(out), phase, str(step), str(mb)]
    child = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    try:
        line = child.stdout.readline().strip()       # blocks until the child is at `phase`
        if line == "unsupported":
            pytest.skip("this file system cannot exchange two folders atomically")
        assert line == "ready", f"the child did not reach {phase!r}: {line!r}"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=120) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.parametrize("phase, visible", [
    ("write", [1, 2]),        # half of model.pt written
    ("manifest", [1, 2]),     # every file written, the manifest under its temporary name
    ("rename", [1, 2]),       # complete, not yet renamed
    ("rotate", [2]),          # rotation killed while deleting checkpoint-1
])
def test_kill_during_save_leaves_no_half_checkpoint(tmp_path, phase, visible):
    cks = make_run(tmp_path, [1, 2])
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    before = {s: snapshot(p) for s, p in cks.items()}
    kill_mid_save(tmp_path, phase, 3)
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"checkpoint-{s}" for s in visible]
    for s in visible:
        assert snapshot(cks[s]) == before[s] and verify_checkpoint(cks[s]) is None
    p, said = resume_with_warnings("latest", tmp_path)
    assert p == cks[2] and said == []
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    left = clean_partial_saves(tmp_path)
    assert len(left) == 1 and left[0].name.startswith(".tmp-" if phase != "rotate" else ".del-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"checkpoint-{s}" for s in visible] + ["metrics.jsonl"])


@pytest.mark.parametrize("phase, holds", [
    ("before swap", "old"),   # the new checkpoint-2 complete beside the old one
    ("swapped", "new"),       # exchanged in one step; the old one not yet deleted
    ("aside", None),          # no exchange: the old one moved aside, the new one not yet in place
])
def test_kill_while_replacing_a_checkpoint(tmp_path, phase, holds):
    "Saving checkpoint-2 again (e.g. after a fallback): the name holds a whole checkpoint or none."
    cks = make_run(tmp_path, [1, 2])
    before = {s: snapshot(p) for s, p in cks.items()}
    kill_mid_save(tmp_path, phase, 2, mb=4)
    assert snapshot(cks[1]) == before[1]
    if holds is None:
        assert list_checkpoints(tmp_path) == [cks[1]]
        assert resolve_resume("latest", tmp_path) == cks[1]
        kept = [p for p in tmp_path.glob(".old-checkpoint-2-*/checkpoint-2")]
        assert len(kept) == 1 and snapshot(kept[0]) == before[2]    # the old one is not lost ...
        assert len(clean_partial_saves(tmp_path)) == 2               # ... and is put back
        assert list_checkpoints(tmp_path) == [cks[1], cks[2]] and snapshot(cks[2]) == before[2]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2"]
        return
    assert list_checkpoints(tmp_path) == [cks[1], cks[2]]
    assert verify_checkpoint(cks[2]) is None and resolve_resume("latest", tmp_path) == cks[2]
    now = snapshot(cks[2])
    assert (now == before[2]) == (holds == "old")
    assert ("trainer_state.pt" in now) == (holds == "old")        # the new one has no such file


# ----- trim_jsonl -----
def test_trim_jsonl_keeps_rows_byte_for_byte(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [b'{"step": 1, "loss": 0.5}', b'{"loss":0.25,  "step":2}', b'{"note": "no step"}',
            b'{"step": 3, "x": "\xc3\xa9"}', b'{"step": 4}']
    log.write_bytes(b"\n".join(rows) + b"\n")
    assert trim_jsonl(log, 2) == 2
    assert log.read_bytes() == b"\n".join(rows[:3]) + b"\n"
    assert trim_jsonl(log, 2) == 0 and log.read_bytes() == b"\n".join(rows[:3]) + b"\n"
    assert trim_jsonl(log, 0) == 2 and log.read_bytes() == rows[2] + b"\n"
    assert trim_jsonl(tmp_path / "absent.jsonl", 3) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_trim_jsonl_torn_last_line_and_bad_line(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert trim_jsonl(log, 5) == 1 and log.read_text() == '{"step": 1}\n{"step": 2}\n'
    log.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError) as info:
        trim_jsonl(log, 1)
    assert str(info.value) == f"{log}, line 2: not a JSON row"
    assert log.read_text() == '{"step": 1}\nnot json\n{"step": 3}\n'


def test_trim_jsonl_is_atomic(tmp_path, monkeypatch):
    log = tmp_path / "m.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n')
    def fail(a, b): raise OSError(28, "No space left on device")
    monkeypatch.setattr(C.os, "replace", fail)
    with pytest.raises(OSError):
        trim_jsonl(log, 1)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]


# ----- modes under the umask -----
@pytest.mark.parametrize("mask, folder, file", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600),
                                                (0o027, 0o750, 0o640)])
def test_modes_follow_the_umask(tmp_path, mask, folder, file):
    def write(tmp):
        make_dir(tmp / "tokenizer")
        (tmp / "tokenizer" / "v.txt").write_text("v")
        (tmp / "w.bin").write_bytes(b"w")
    def mode(p): return p.stat().st_mode & 0o777
    with umask(mask):
        assert C._umask() == mask
        out = check_output_dir(tmp_path / "runs" / "a")
        ck = atomic_save_dir(out / "checkpoint-1", write)
        final = atomic_save_dir(out / "final", write)
        final = atomic_save_dir(out / "final", write)          # replacing keeps the mode
        log = out / "metrics.jsonl"
        log.write_text('{"step": 1}\n{"step": 2}\n')
        os.chmod(log, 0o644 & ~mask)
        trim_jsonl(log, 1)
    for d in (tmp_path / "runs", out, ck, ck / "tokenizer", final):
        assert mode(d) == folder, (d, oct(mode(d)))
    for f in (ck / "w.bin", ck / MANIFEST, final / MANIFEST, log):
        assert mode(f) == file, (f, oct(mode(f)))


@pytest.fixture
def tiny_tmpfs(tmp_path):
    "A 256 KiB tmpfs, to run out of space on for real; skipped where it cannot be mounted."
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not IS_ROOT or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode:
        pytest.skip(f"mount failed: {r.stderr.decode()[-200:]}")
    try:
        yield mnt
    finally:
        import gc
        gc.collect()                                   # the failed writer's file handle
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_full_disk_is_an_oserror_that_says_so(tiny_tmpfs):
    "torch.save reports a full disk as a RuntimeError; the save turns it into ENOSPC, cleaned up."
    import errno
    import torch
    write = lambda d: torch.save(torch.zeros(200_000), d / "model.pt")   # 800 kB > 256 KiB
    with pytest.raises(OSError) as info:
        atomic_save_dir(tiny_tmpfs / "checkpoint-1", write)
    assert info.value.errno == errno.ENOSPC and "no space left" in str(info.value)
    assert "checkpoint-1" in str(info.value)
    assert list(tiny_tmpfs.iterdir()) == []                        # nothing half-written is left
