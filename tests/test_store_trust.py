"""What the store does with hostile or damaged folders: names that escape, bit rot, half-finished commits,
symlinks, read-only stores. Real DFAR builds and the real CLI throughout."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from builders.dfar import DfarConfig, build_dfar
from curate.cli import app
from curate.errors import CurateError
from curate.store import DatasetStore

REPO = Path(__file__).resolve().parents[1]
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL, symlinks and read-only folders are POSIX")


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(res) -> str:
    """The command failed the way users should see it: exit 1, one line on stderr, no traceback."""
    assert res.exit_code == 1, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


@pytest.fixture
def dfar(tmp_path: Path, dfar_source: Path):
    """A fresh store holding one real DFAR build: (store, version, source)."""
    st = DatasetStore(tmp_path / "store")
    return st, build_dfar(st, dfar_source).version, dfar_source


def _age(*paths: Path) -> None:
    """Make paths look an hour old (a crash long ago rather than a writer starting up right now)."""
    then = time.time() - 3600
    for p in paths:
        os.utime(p, (then, then), follow_symlinks=False)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.lstat().st_mtime_ns, p.lstat().st_size) for p in root.rglob("*")}


# ---- 1. names ------------------------------------------------------------------------------------------
@posix_only
def test_names_cannot_leave_the_store(dfar, tmp_path: Path) -> None:
    st, v, _ = dfar
    line = one_line_error(cli("show", "../../outside", "--store", st.root))
    assert "'../../outside' is not allowed" in line
    line = one_line_error(cli("push", "../../outside", "x/y", "--store", st.root))
    assert "'../../outside' is not allowed" in line
    for bad in ("../../outside", "/abs", "a/b", "..", "Dfar"):
        for call, args in ((st.get, (bad,)), (st.versions, (bad,)), (st.work_dir, (bad, "k")),
                           (st.import_version, (bad, v.path, v.hash))):
            with pytest.raises(CurateError, match="not allowed"):
                call(*args)
        with pytest.raises(CurateError, match="not allowed"):
            with st.new_version(bad, builder="x", builder_version="0", params={}, sources=[]):
                pass
    with pytest.raises(CurateError, match="work key"):
        st.work_dir("dfar", "../../escape")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]

    # A tags file pointing out of the dataset, or a dataset folder that is a symlink elsewhere: refused.
    tags = st.root / "datasets" / "dfar" / "tags.json"
    tags.write_text(json.dumps({"v1": "../../../../outside"}))
    assert str(tags) in one_line_error(cli("show", "dfar", "--store", st.root))
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(st.root / "datasets" / "dfar", elsewhere)
    (st.root / "datasets" / "evil").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(CurateError, match="outside the store"):
        st.versions("evil")


# ---- 2. verify and repair --------------------------------------------------------------------------------
def test_verify_names_the_bad_file_and_a_rebuild_repairs_it(dfar, tmp_path: Path) -> None:
    st, v, source = dfar
    res = cli("verify", "--store", st.root)
    assert res.exit_code == 0 and "OK: 1 version(s) of 1 dataset(s)" in res.stdout, res.output
    good = {p.relative_to(v.path).as_posix(): p.read_bytes() for p in v.path.rglob("*.parquet")}

    truncated = v.path / "default" / "train-00000-of-00001.parquet"
    truncated.write_bytes(good["default/train-00000-of-00001.parquet"][:5000])
    flipped = v.path / "lr" / "test-00000-of-00001.parquet"
    data = bytearray(good["lr/test-00000-of-00001.parquet"])
    data[len(data) // 2] ^= 0x55  # inside a data page: still readable as parquet or not, never silently equal
    flipped.write_bytes(bytes(data))
    for args in (("verify",), ("verify", "dfar"), ("verify", "dfar@v1")):
        res = cli(*args, "--store", st.root)
        assert res.exit_code == 1, res.output
        bad = [line for line in res.stderr.splitlines() if line.startswith("bad:")]
        assert len(bad) == 2, res.output
        assert str(truncated) in bad[0] or str(truncated) in bad[1]
        assert any(str(flipped) in line for line in bad)
    assert len(st.verify(v)) == 2

    res = cli("build", "dfar", "--source", source, "--store", st.root)
    assert res.exit_code == 0, res.output
    assert f"repaired dfar@v1 ({v.hash[:16]}" in res.stdout and "unchanged" not in res.stdout
    assert "repaired dfar@v1: 2 damaged file(s)" in res.stderr  # which files, as a warning
    assert [x.tag for x in st.versions("dfar")] == ["v1"]
    assert {p.relative_to(v.path).as_posix(): p.read_bytes() for p in v.path.rglob("*.parquet")} == good
    assert st.verify(st.get("dfar")) == []
    assert cli("verify", "--store", st.root).exit_code == 0
    typo = cli("verify", "dfra", "--store", st.root)  # a misspelt name is an error, not a clean bill
    assert typo.exit_code == 1 and "no dataset named 'dfra'" in typo.output and "datasets: dfar" in typo.output
    assert len(typo.output.strip().splitlines()) == 1, typo.output


def test_damaged_manifest_or_tags_is_one_line_naming_the_file(dfar, tmp_path: Path) -> None:
    st, v, source = dfar
    build_dfar(st, source, name="other")
    manifest = v.path / "manifest.json"
    text = manifest.read_text()
    for damage in (text[: len(text) // 2], "", "[]"):
        manifest.write_text(damage)
        assert str(manifest) in one_line_error(cli("show", "dfar", "--store", st.root))
    manifest.unlink()
    assert f"{manifest}: missing" in one_line_error(cli("show", "dfar", "--store", st.root))
    with pytest.raises(CurateError, match="manifest.json"):
        st.versions("dfar")
    res = cli("verify", "--store", st.root)
    assert res.exit_code == 1 and f"{manifest}: missing" in res.stderr
    r = build_dfar(st, source)  # an identical rebuild replaces the folder and keeps its tag
    assert not r.created and r.version.tag == "v1" and r.version.path == v.path
    assert st.verify(st.get("dfar")) == [] and json.loads(manifest.read_text())["content_hash"] == v.hash

    tags = st.root / "datasets" / "other" / "tags.json"
    tags.write_text('{"v1": "abc')  # truncated
    assert str(tags) in one_line_error(cli("show", "other", "--store", st.root))
    res = cli("verify", "--store", st.root)
    assert res.exit_code == 1 and str(tags) in res.stderr
    res = cli("datasets", "--store", st.root)  # the good dataset is still listed; the damaged one is a warning
    assert res.exit_code == 0, res.output
    assert "dfar" in res.stdout and "warning" in res.stderr and str(tags) in res.stderr
    assert [x.name for x in st.all_versions()] == ["dfar"]


# ---- 3. crash-safe commit -----------------------------------------------------------------------------------
KILL_AFTER_RENAME = r"""
import os, signal, sys
for fn in ("rename", "replace"):
    real = getattr(os, fn)
    def killing(src, dst, *a, _real=real, **k):
        _real(src, dst, *a, **k)
        if os.path.basename(os.path.dirname(os.fspath(dst))) == "versions":  # the version folder is in place
            os.kill(os.getpid(), signal.SIGKILL)
    setattr(os, fn, killing)
from builders.dfar import DfarConfig, build_dfar
from curate.store import DatasetStore
limit = int(sys.argv[3]) or None
build_dfar(DatasetStore(sys.argv[1]), sys.argv[2], DfarConfig(limit=limit))
"""


def _killed_build(store: Path, source: Path, limit: int = 0) -> None:
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_RENAME, str(store), str(source), str(limit)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


@posix_only
def test_kill_between_rename_and_tags_is_adopted(tmp_path: Path, dfar_source: Path) -> None:
    root = tmp_path / "store"
    _killed_build(root, dfar_source)
    ds = root / "datasets" / "dfar"
    [folder] = list((ds / "versions").iterdir())
    assert not (ds / "tags.json").exists()  # killed before the tag was written
    assert list(ds.glob(".tmp-*.lock"))  # the dead writer's lock file is left behind
    _age(*ds.glob(".tmp-*"))  # (temps younger than a minute are spared: their writer may be starting up)

    res = cli("show", "dfar", "--store", root)  # reads see the complete version
    assert res.exit_code == 0 and "dfar@v1" in res.stdout, res.output
    st = DatasetStore(root)
    again = build_dfar(st, dfar_source)
    assert not again.created and again.version.tag == "v1" and again.version.path == folder
    assert json.loads((ds / "tags.json").read_text()) == {"v1": folder.name}
    assert sorted(p.name for p in ds.iterdir()) == [".lock", "tags.json", "versions"]
    assert cli("verify", "--store", root).exit_code == 0

    # A second killed commit whose folder then rots is replaced by the next identical build.
    _killed_build(root, dfar_source, limit=5)
    _age(*ds.glob(".tmp-*"))
    [orphan] = [p for p in (ds / "versions").iterdir() if p != folder]
    assert json.loads((ds / "tags.json").read_text()) == {"v1": folder.name}
    (orphan / "default" / "train-00000-of-00001.parquet").write_bytes(b"PAR1 rotten")
    r = st.versions("dfar")[-1]
    assert r.path == orphan and r.tag == "v2"
    fixed = build_dfar(st, dfar_source, DfarConfig(limit=5))
    assert not fixed.created and fixed.version.tag == "v2" and fixed.version.path == orphan
    assert json.loads((ds / "tags.json").read_text()) == {"v1": folder.name, "v2": orphan.name}
    assert all(st.verify(x) == [] for x in st.versions("dfar"))
    assert not list(ds.glob(".tmp-*"))


HOLD_LOCK = "import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); " \
            "print('held', flush=True); time.sleep(120)"


def test_stale_temp_folders_are_removed_live_ones_kept(dfar, tmp_path: Path) -> None:
    st, v, source = dfar
    ds = st.root / "datasets" / "dfar"
    dead = ds / f".tmp-{uuid.uuid4().hex}"
    (dead / "default").mkdir(parents=True)
    (dead / "default" / "train-00000-of-00001.parquet").write_bytes(b"half")
    Path(f"{dead}.lock").touch()
    half_tags = ds / f".tags.json.tmp-{uuid.uuid4().hex}"
    half_tags.write_text("{")
    live = ds / f".tmp-{uuid.uuid4().hex}"
    live.mkdir()
    staging = st.root / "staging"
    staging.mkdir()
    (staging / "dead").mkdir()
    (staging / "dead.lock").touch()
    (staging / "live").mkdir()
    _age(*ds.glob(".*tmp-*"), *staging.iterdir())
    fresh = ds / f".tmp-{uuid.uuid4().hex}"  # just created: its writer may not have taken its lock yet
    fresh.mkdir()
    holders = [subprocess.Popen([sys.executable, "-c", HOLD_LOCK, f"{p}.lock"], stdout=subprocess.PIPE, text=True)
               for p in (live, staging / "live")]
    try:
        assert all(h.stdout.readline().strip() == "held" for h in holders)
        _age(*ds.glob(".tmp-*.lock"), *staging.glob("*.lock"))
        r = build_dfar(st, source, DfarConfig(limit=3))  # any write of the dataset cleans up
        assert r.created and r.version.tag == "v2"
        assert not dead.exists() and not Path(f"{dead}.lock").exists() and not half_tags.exists()
        assert live.is_dir() and (staging / "live").is_dir() and fresh.is_dir()
        assert not (staging / "dead").exists() and not (staging / "dead.lock").exists()
    finally:
        for h in holders:
            h.kill()
            h.wait()
    _age(*ds.glob(".tmp-*.lock"), *staging.glob("*.lock"))
    build_dfar(st, source)  # the writers are gone now: their folders are stale
    assert not live.exists() and not (staging / "live").exists()


# ---- 4. stores that are files or read-only -----------------------------------------------------------------
def test_store_that_is_a_file(tmp_path: Path, dfar_source: Path) -> None:
    f = tmp_path / "store.txt"
    f.write_text("not a store")
    for args in (("datasets",), ("show", "dfar"), ("verify",), ("build", "dfar", "--source", dfar_source)):
        assert "is a file, not a folder" in one_line_error(cli(*args, "--store", f))
    assert f.read_text() == "not a store"


READ_ONLY_MOUNT = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'


def _as_reader(store: Path, *args: object) -> subprocess.CompletedProcess[str]:
    """Run the CLI on a store it cannot write: as root (which ignores permissions) through a read-only bind
    mount in a private mount namespace, otherwise with the store's folders made read-only by the caller."""
    cmd = [sys.executable, "-c", "import sys; from curate.cli import main; sys.argv[0] = 'curate'; main()",
           *map(str, args)]
    if os.geteuid() == 0:
        if not shutil.which("unshare"):
            pytest.skip("running as root without `unshare`: cannot make a read-only store")
        cmd = ["unshare", "-m", "sh", "-c", READ_ONLY_MOUNT, "sh", str(store), *cmd]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


@posix_only
def test_read_only_store(tmp_path: Path, dfar_source: Path) -> None:
    st = DatasetStore(tmp_path / "store")
    v = build_dfar(st, dfar_source).version
    try:
        if os.geteuid() != 0:
            for p in [st.root, *st.root.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o555)
        before = _tree(st.root)
        res = _as_reader(st.root, "show", "dfar", "--store", st.root)
        if res.returncode != 0 and "mount" in res.stderr:
            pytest.skip(f"cannot mount read-only here: {res.stderr.strip()[:200]}")
        assert res.returncode == 0 and "dfar@v1" in res.stdout, res.stderr
        res = _as_reader(st.root, "build", "dfar", "--source", dfar_source, "--store", st.root)
        assert res.returncode == 0, res.stderr
        assert f"unchanged, already stored as dfar@v1 ({v.hash[:16]}" in res.stdout
        res = _as_reader(st.root, "build", "dfar", "--source", dfar_source, "--limit", "4", "--store", st.root)
        assert res.returncode == 1, res.stdout + res.stderr
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]  # (builder logs aside)
        assert len(errors) == 1 and f"store {st.root} is not writable" in errors[0], res.stderr
        assert "Traceback" not in res.stderr
        assert _tree(st.root) == before  # not one byte, lock or temp folder written
    finally:
        for p in [st.root, *st.root.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)


# ---- 6. symlinks and files the manifest does not list ---------------------------------------------------------
@posix_only
def test_parquet_replaced_by_symlink_is_refused(dfar, tmp_path: Path) -> None:
    st, v, _ = dfar
    target = v.path / "default" / "test-00000-of-00001.parquet"
    outside = tmp_path / "outside.parquet"
    shutil.copyfile(target, outside)  # same bytes even: a link is refused for what it is
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(CurateError, match="symbolic link"):
        v.read("default")
    with pytest.raises(CurateError, match="symbolic link"):
        st.get("dfar")
    assert str(target) in one_line_error(cli("show", "dfar", "--store", st.root))
    assert str(target) in one_line_error(cli("query", "SELECT count(*) FROM dfar", "--store", st.root))
    res = cli("verify", "--store", st.root)
    assert res.exit_code == 1 and str(target) in res.stderr and "symbolic link" in res.stderr


@posix_only
def test_extra_files_and_links_are_refused_and_repaired(dfar, tmp_path: Path) -> None:
    st, v, source = dfar
    secret = tmp_path / "secret.txt"
    secret.write_text("token")
    leak = v.path / "leak.txt"
    leak.symlink_to(secret)
    line = one_line_error(cli("push", "dfar@v1", "org/dfar", "--store", st.root, "--endpoint", "http://127.0.0.1:9"))
    assert str(leak) in line and "symbolic link" in line
    leak.unlink()
    stray = v.path / "l" / "notes.txt"
    stray.write_text("not in the manifest")
    with pytest.raises(CurateError, match="not listed in the manifest"):
        v.files("l")
    assert str(stray) in one_line_error(cli("push", "dfar@v1", "org/dfar", "--store", st.root,
                                            "--endpoint", "http://127.0.0.1:9"))
    res = cli("verify", "dfar", "--store", st.root)
    assert res.exit_code == 1 and str(stray) in res.stderr
    leak.symlink_to(secret)
    r = build_dfar(st, source)  # an identical rebuild puts the version back to what its manifest lists
    assert not r.created and not stray.exists() and not leak.is_symlink() and secret.read_text() == "token"
    assert st.verify(st.get("dfar")) == []


@posix_only
def test_symlinked_version_folder_is_refused(dfar, tmp_path: Path) -> None:
    st, v, _ = dfar
    moved = tmp_path / "moved"
    v.path.rename(moved)
    v.path.symlink_to(moved, target_is_directory=True)
    with pytest.raises(CurateError, match="version folder is a symbolic link"):
        st.get("dfar")
    assert str(v.path) in one_line_error(cli("show", "dfar", "--store", st.root))
    res = cli("verify", "--store", st.root)
    assert res.exit_code == 1 and str(v.path) in res.stderr and "symbolic link" in res.stderr


BUILD = "import sys; from builders.dfar import build_dfar; from curate.store import DatasetStore; " \
        "r = build_dfar(DatasetStore(sys.argv[1]), sys.argv[2]); print(r.created, r.version.tag)"


def test_concurrent_identical_builds_make_one_version(tmp_path: Path, dfar_source: Path) -> None:
    root = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(root), str(dfar_source)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1000:] for o in outs]
    assert sorted(o[0].split()[0] for o in outs) == ["False", "False", "True"]
    assert {o[0].split()[1] for o in outs} == {"v1"}
    st = DatasetStore(root)
    assert [v.tag for v in st.versions("dfar")] == ["v1"] and st.verify(st.get("dfar")) == []
    assert sorted(p.name for p in (root / "datasets" / "dfar").iterdir()) == [".lock", "tags.json", "versions"]


# ---- 10. reads never serve a damaged file -------------------------------------------------------------------------
def _stamps(st: DatasetStore, v) -> dict[str, list[int]]:
    return json.loads((st.root / "stamps" / v.name / f"{v.path.name}.json").read_text())["files"]


def test_reads_and_queries_refuse_a_changed_file(dfar, tmp_path: Path) -> None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    st, v, source = dfar
    assert set(_stamps(st, v)) == set(v.manifest["data_files"])  # stamped at commit: the first read hashes nothing
    ok = cli("query", "SELECT count(*) AS n FROM dfar__lr", "--store", st.root, "--format", "csv")
    assert ok.exit_code == 0, ok.output
    n_lr = int(ok.stdout.split()[-1])

    # 1. one byte flipped in place
    flipped = v.path / "lr" / "test-00000-of-00001.parquet"
    good = flipped.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0x55
    flipped.write_bytes(bytes(data))
    line = one_line_error(cli("query", "SELECT count(*) FROM dfar__lr", "--store", st.root))
    assert str(flipped) in line and "not served" in line
    with pytest.raises(CurateError, match="not served"):
        st.get("dfar").read("lr", "test")
    # the other configs of the same version are intact and still answer
    res = cli("query", "SELECT count(*) FROM dfar", "--store", st.root)
    assert res.exit_code == 0, res.output

    # 2. a well-formed parquet with one value changed (readable, so only the digest can tell)
    table = pq.read_table(v.path / "lr" / "train-00000-of-00001.parquet")
    i = table.column_names.index("completion")
    forged = table.set_column(i, "completion", pc.replace_substring(table["completion"], "a", "e", max_replacements=1))
    assert forged != table
    pq.write_table(forged, v.path / "lr" / "train-00000-of-00001.parquet", compression="zstd")
    with pytest.raises(CurateError, match="content differs from the manifest"):
        st.get("dfar").read("lr", "train")

    # 3. a rebuild repairs both; reads answer again with the original count
    assert cli("build", "dfar", "--source", source, "--store", st.root).exit_code == 0
    res = cli("query", "SELECT count(*) AS n FROM dfar__lr", "--store", st.root, "--format", "csv")
    assert res.exit_code == 0 and int(res.stdout.split()[-1]) == n_lr, res.output


def test_only_changed_files_are_rehashed(dfar, tmp_path: Path) -> None:
    st, v, _ = dfar
    rel = "lr/test-00000-of-00001.parquet"
    before = _stamps(st, v)[rel]
    p = v.path / rel
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))  # touched, content unchanged
    assert st.get("dfar").read("lr", "test").num_rows > 0
    after = _stamps(st, v)[rel]
    assert after != before and after == [p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino]

    # The documented limit: a change that keeps size, mtime and inode (media bit rot) is not seen by reads,
    # only by `curate verify`, which re-hashes everything.
    data = bytearray(p.read_bytes())
    mtime = p.stat().st_mtime_ns
    data[len(data) // 2] ^= 0x55
    with open(p, "r+b") as f:  # in place: same inode and size
        f.write(bytes(data))
    os.utime(p, ns=(mtime, mtime))
    assert _stamps(st, v)[rel] == [p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino]
    assert any(str(p) in line for line in st.verify(st.get("dfar")))
