"""packaging/install.sh: what a user installs is whole. wsfs in its own venv, `wsfs` and the
mount helpers linked into place, and the systemd units' ExecStart= and Documentation= naming
files that exist after the install, wherever it installs (WSFS_PREFIX); re-running upgrades.
And no doc sends anyone to `pip install wsfs` from a registry, where wsfs is not published.

The install here goes into a temporary prefix and temporary link directories; README's own
commands on fresh Debian machines are checked by .ci/run (../shared/tools/fresh-debian).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "packaging" / "install.sh"
UNITS = ROOT / "packaging" / "systemd"
DEFAULT_PREFIX = "/opt/wsfs"
HELPERS = ("mount.fuse.wsfs", "mount.wsfs", "umount.fuse.wsfs")


def unit_settings(text: str) -> list[tuple[str, str]]:
    lines = [line for line in text.splitlines() if not line.lstrip().startswith(("#", ";"))]
    return [(k.strip(), v.strip()) for k, _, v in (line.partition("=") for line in lines) if v]


def executables(text: str) -> list[str]:
    """The programs of every Exec*= line, without systemd's prefixes (-, @, +, !, :)."""
    return [value.split()[0].lstrip("-@+!:") for key, value in unit_settings(text)
            if key.startswith("Exec")]


def documentation(text: str) -> list[str]:
    return [url for key, value in unit_settings(text) if key == "Documentation"
            for url in value.split()]


@pytest.mark.smoke
def test_repo_units_name_what_an_install_provides() -> None:
    """The units as shipped are written for the default prefix: each program is a console script
    of the package or a system binary, each document a file that install.sh copies."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for unit in sorted(UNITS.iterdir()):
        text = unit.read_text()
        for exe in executables(text):
            if exe.startswith(DEFAULT_PREFIX):
                assert exe.removeprefix(f"{DEFAULT_PREFIX}/bin/") in scripts, (unit.name, exe)
            else:
                assert Path(exe).exists(), (unit.name, exe)
        docs = documentation(text)
        assert docs, unit.name
        for url in docs:
            doc = url.removeprefix(f"file://{DEFAULT_PREFIX}/share/doc/wsfs/")
            assert doc != url, (unit.name, url)
            assert (ROOT / doc).is_file(), (unit.name, url)


def install(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable, "WSFS_PREFIX": str(tmp_path / "prefix"),
           "WSFS_BIN_DIR": str(tmp_path / "bin"), "WSFS_SBIN_DIR": str(tmp_path / "sbin"),
           "WSFS_UNIT_DIR": str(tmp_path / "units")}
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True,
                          env=env, timeout=600)


def check_installed(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    wsfs = tmp_path / "bin" / "wsfs"
    assert wsfs.resolve() == (prefix / "bin" / "wsfs").resolve()
    version = subprocess.run([str(wsfs), "--version"], capture_output=True, text=True,
                             timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("wsfs "), version
    for name in HELPERS:
        assert (tmp_path / "sbin" / name).resolve() == (prefix / "bin" / "mount.wsfs").resolve()
    installed = [*(tmp_path / "units").iterdir(),
                 *(prefix / "share" / "doc" / "wsfs" / "examples").iterdir()]
    assert sorted(u.name for u in installed) == sorted(u.name for u in UNITS.iterdir())
    for unit in installed:
        text = unit.read_text()
        assert DEFAULT_PREFIX not in text, unit
        for exe in executables(text):
            assert os.access(exe, os.X_OK), (unit.name, exe)
        for url in documentation(text):
            assert url.startswith("file://") and Path(url[len("file://"):]).is_file(), \
                (unit.name, url)
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(["systemd-analyze", "verify", "wsfs@workspace.service"],
                                capture_output=True, text=True, timeout=60,
                                cwd=tmp_path / "units")
        output = (verify.stdout + verify.stderr).strip()
        assert verify.returncode == 0 and output == "", output


@pytest.mark.smoke
def test_install_into_a_prefix_is_whole_and_rerunning_upgrades(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("install.sh runs as root (or re-runs itself through sudo)")
    result = install(tmp_path)
    assert result.returncode == 0, result.stderr
    check_installed(tmp_path)
    # A broken or older install is replaced by the next run, at the same version number; this
    # time from a wheel, built the way the docs say.
    prefix = tmp_path / "prefix"
    cli = next(prefix.glob("lib/python3*/site-packages/wsfs/commands/cli.py"))
    cli.write_text("raise SystemExit('stale')\n")
    tree = tmp_path / "tree"  # a copy: a build in the checkout would leave build/ behind
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree)
    shutil.copytree(ROOT / "wsfs", tree / "wsfs", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([str(prefix / "bin" / "python"), "-m", "pip", "wheel", "-q", "--no-deps",
                    str(tree), "-w", str(tmp_path / "dist")], check=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("wsfs-*.whl"))
    result = install(tmp_path, str(wheel))
    assert result.returncode == 0, result.stderr
    check_installed(tmp_path)
    # --uninstall takes away all it put in place.
    result = install(tmp_path, "--uninstall")
    assert result.returncode == 0, result.stderr
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                  if p.is_file() or p.is_symlink())
    assert [p for p in left if not p.startswith(("tree/", "dist/"))] == []


def test_the_default_install_puts_the_helpers_where_mount8_runs_them(tmp_path: Path) -> None:
    """mount(8) runs helpers from /sbin only (/usr/sbin on a merged /usr; its /sbin/fs.d comes
    after fuse3's /sbin/mount.fuse): install.sh's default puts them there, and mount(8) runs
    them (the refusal of an unknown option is the helper's sentence). The links an earlier
    install made are put back afterwards."""
    if os.geteuid() != 0:
        pytest.skip("install.sh runs as root (or re-runs itself through sudo)")
    sbin = Path("/sbin")
    before = {name: os.readlink(sbin / name) for name in HELPERS if (sbin / name).is_symlink()}
    env = {**os.environ, "PYTHON": sys.executable, "WSFS_PREFIX": str(tmp_path / "prefix"),
           "WSFS_BIN_DIR": str(tmp_path / "bin"), "WSFS_UNIT_DIR": str(tmp_path / "units")}
    env.pop("WSFS_SBIN_DIR", None)
    try:
        result = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True, env=env,
                                timeout=600)
        assert result.returncode == 0, result.stderr
        assert "runs helpers from /sbin only" not in result.stderr
        script = tmp_path / "prefix" / "bin" / "mount.wsfs"
        for name in HELPERS:
            assert (sbin / name).resolve() == script.resolve(), name
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        mount = subprocess.run(["mount", "-t", "fuse.wsfs", "-o", "no_such_option",
                                "file:///nowhere", str(mnt)], capture_output=True, text=True,
                               timeout=120)
        assert "unknown mount option 'no_such_option'" in mount.stderr, mount.stderr
    finally:
        for name in HELPERS:
            (sbin / name).unlink(missing_ok=True)
            if name in before:
                (sbin / name).symlink_to(before[name])


def test_helpers_installed_where_mount8_does_not_look_are_reported(tmp_path: Path) -> None:
    """A WSFS_SBIN_DIR (or SBIN_DIR) other than /sbin installs helpers nobody runs: said."""
    sbin = tmp_path / "usr-local-sbin"
    sbin.mkdir()
    result = subprocess.run(["sh", str(ROOT / "packaging" / "install-mount-helper.sh")],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHON": sys.executable, "SBIN_DIR": str(sbin)})
    assert result.returncode == 0, result.stderr
    assert f"mount(8) runs helpers from /sbin only, not from {sbin}" in result.stderr


def test_without_root_or_sudo_install_says_so_in_one_line() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the script as another user")
    path = "/usr/bin:/bin"
    if shutil.which("sudo", path=path):
        pytest.skip("this machine has sudo: install.sh would use it")
    # A copy the user can read (the checkout may be in /root, pytest's tmp_path is 0700).
    public = Path(tempfile.mkdtemp(prefix="wsfs-install-"))
    try:
        public.chmod(0o755)
        script = public / "packaging" / "install.sh"
        script.parent.mkdir(mode=0o755)
        shutil.copy(INSTALL, script)
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", str(script)],
            capture_output=True, text=True, timeout=60, cwd=public,
            env={"PATH": path, "HOME": str(public), "PYTHON": "/usr/bin/python3"})
    finally:
        shutil.rmtree(public)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "run as root" in result.stderr, result.stderr
    assert "no sudo" in result.stderr


# A registry install of wsfs: `pip install wsfs`, `pip install -U wsfs[test]`, ... (not a
# path such as `pip install /src/wsfs` or `pip install .`).
REGISTRY_INSTALL = re.compile(r"pip3? install(\s+-{1,2}[\w-]+(=\S+)?)*\s+['\"]?wsfs\b(?![/.\w-])")


def test_no_doc_says_pip_install_wsfs_from_a_registry() -> None:
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"),
             *(p for p in (ROOT / "packaging").rglob("*") if p.is_file()),
             *(ROOT / "wsfs").rglob("*.py")]
    bad = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
           for path in files
           for n, line in enumerate(path.read_text().splitlines(), 1)
           if REGISTRY_INSTALL.search(line)]
    assert not bad, "wsfs is not on a registry; say `bash packaging/install.sh`:\n" + \
        "\n".join(bad)


def test_the_registry_pattern_matches_what_it_should() -> None:
    """Control for the check above."""
    assert REGISTRY_INSTALL.search("pip install wsfs")
    assert REGISTRY_INSTALL.search("python3 -m pip install -U wsfs[test]")
    assert not REGISTRY_INSTALL.search("pip install /src/wsfs jupyterlab")
    assert not REGISTRY_INSTALL.search("pip install . in this source tree")
    assert not REGISTRY_INSTALL.search("bash packaging/install.sh dist/wsfs-0.1.0.whl")
