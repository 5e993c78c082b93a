"""One configuration, everywhere: every option of `wsfs mount` as a flag, as `-o name=value` and
as a `WSFS_NAME` variable, with the precedence flag > -o > environment > default; the user
guide's table equal to the code's; help texts that read well.

The parser tests need no root and no mount; the rest run the real command line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import Workspace, run_wsfs
from s3servers import S3Server
from test_badinput import attempt, check_refused, mount_args
from test_container import Entrypoint, keyless_env, secret_rclone

from wsfs import __version__
from wsfs.commands import options
from wsfs.commands.cli import build_parser
from wsfs.config import MountConfig, env_seconds
from wsfs.errors import StoreError, UsageError
from wsfs.runtime import is_mountpoint

ROOT = Path(__file__).resolve().parent.parent
__all__ = ["secret_rclone"]  # the fixture, shared with test_container

# A value for each option and what MountConfig must hold for it (switches: given means on).
SAMPLES: dict[str, tuple[str, Any]] = {
    "endpoint_url": ("http://127.0.0.1:9", "http://127.0.0.1:9"),
    "region": ("gra", "gra"),
    "profile": ("alt", "alt"),
    "credentials_file": ("/etc/wsfs/x.credentials", Path("/etc/wsfs/x.credentials")),
    "cache_dir": ("/var/cache/wsfs/x", Path("/var/cache/wsfs/x")),
    "cache_size": ("5G", 5 << 30),
    "dirty_limit": ("512M", 512 << 20),
    "flush_delay": ("2.5", 2.5),
    "fsync": ("remote", True),
    "unmount_timeout": ("30", 30.0),
    "handover_timeout": ("45", 45.0),
    "read_timeout": ("7", 7.0),
    "enospc_timeout": ("0", 0.0),
    "keep": ("1h+30d:1d", "1h+30d:1d"),
    "read_only": ("1", True),
    "at": ("2h", "2h"),
    "refresh": ("0.5", 0.5),
    "nonempty": ("1", True),
    "metrics": ("127.0.0.1:9100", "127.0.0.1:9100"),
    "force": ("1", True),
    "init": ("yes", True),
    "framework": ("pytorch", "pytorch"),
    "label": ("team=ml", {"team": "ml"}),
    "owner": ("1000:100", (1000, 100)),
}


def parse(*argv: str, env: dict[str, str] | None = None) -> MountConfig:
    """`wsfs mount STORE /mnt ARGV...` with the environment `env`, as main() parses it."""
    args = build_parser().parse_args(["mount", "s3://bucket/ws", "/mnt", *argv])
    options.resolve(args, env or {})
    return options.mount_config(args)


def field(cfg: MountConfig, name: str) -> Any:
    return getattr(cfg, options.BY_NAME[name].field)


def forms(name: str, text: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    """The three ways to give option `name` the value `text`: arguments and environment."""
    o = options.BY_NAME[name]
    flag = [o.flag] if o.switch else [o.flag, text]
    return {"flag": (flag, {}),
            "-o": (["-o", o.key if o.switch else f"{o.key}={text}"], {}),
            "env": ([], {o.env: text})}


@pytest.mark.cli
def test_every_mount_option_has_a_sample_and_a_config_field() -> None:
    assert sorted(SAMPLES) == sorted(options.MOUNT)
    fields = set(MountConfig.__dataclass_fields__)
    for name in options.MOUNT:
        assert options.BY_NAME[name].field in fields, name


@pytest.mark.cli
@pytest.mark.parametrize("form", ["flag", "-o", "env"])
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_each_option_in_each_form_reaches_the_config(name: str, form: str) -> None:
    text, expected = SAMPLES[name]
    argv, env = forms(name, text)[form]
    assert field(parse(*argv, env=env), name) == expected
    default = field(parse(), name)
    assert default != expected, f"{name}: the sample must differ from the default"


@pytest.mark.cli
def test_defaults() -> None:
    cfg = parse()
    assert (cfg.cache_size, cfg.dirty_limit, cfg.flush_delay) == (10 << 30, 2 << 30, 5.0)
    assert (cfg.unmount_timeout, cfg.read_timeout, cfg.enospc_timeout) == (600, 60, 60)
    assert cfg.handover_timeout == 600
    assert not (cfg.fsync_remote or cfg.read_only or cfg.init or cfg.force or cfg.nonempty)
    assert (cfg.cache_dir, cfg.endpoint_url, cfg.metrics, cfg.credentials_file) == (None,) * 4
    assert cfg.labels == {}


@pytest.mark.cli
@pytest.mark.parametrize(("name", "values"), [
    ("cache_size", ("1G", "2G", "3G")),
    ("fsync", ("remote", "local", "remote")),
    ("endpoint_url", ("http://flag", "http://o", "http://env")),
    ("label", ("a=flag", "a=o", "a=env")),
])
def test_precedence_flag_then_o_then_environment_then_default(
        name: str, values: tuple[str, str, str]) -> None:
    o = options.BY_NAME[name]
    flag_v, o_v, env_v = values
    flag, o_opt, env = [o.flag, flag_v], ["-o", f"{o.key}={o_v}"], {o.env: env_v}

    def value(text: str) -> Any:
        return field(parse(o.flag, text), name)

    assert field(parse(*flag, *o_opt, env=env), name) == value(flag_v)
    assert field(parse(*o_opt, env=env), name) == value(o_v)
    assert field(parse(env=env), name) == value(env_v)
    assert field(parse(env={o.env: ""}), name) == field(parse(), name)  # empty: unset


@pytest.mark.cli
def test_precedence_of_switches() -> None:
    assert parse("--no-init", env={"WSFS_INIT": "1"}).init is False
    assert parse("-o", "init=0", env={"WSFS_INIT": "1"}).init is False
    assert parse("--read-only", "-o", "rw").read_only is True
    assert parse("-o", "ro,rw").read_only is False  # the last one wins, as for mount(8)
    assert parse("-o", "rw", env={"WSFS_READ_ONLY": "1"}).read_only is False
    assert parse(env={"WSFS_READ_ONLY": "1"}).read_only is True


@pytest.mark.cli
def test_fuse_flags_and_ignored_options_stay_out_of_the_table() -> None:
    cfg = parse("-o", "allow_other,noatime,_netdev,x-systemd.automount,fsname=x,owner")
    assert cfg.fuse_options == {"allow_other", "noatime"}


@pytest.mark.cli
def test_of_two_opposite_kernel_flags_the_last_wins() -> None:
    """As for mount(8): `dev,nodev` is nodev; both went to libfuse in a set's order before."""
    assert parse("-o", "dev,suid,noexec", "-o", "nodev,exec").fuse_options == {"suid", "nodev",
                                                                               "exec"}


@pytest.mark.cli
def test_every_generic_option_is_judged_and_libfuse_gets_only_kernel_flags() -> None:
    """Each name of the GENERIC table: a refused one fails with its reason, the others mount,
    and what reaches libfuse is only what every libfuse 3 takes (3.14 refused relatime,
    lazytime, nodiratime, strictatime: exit 6 after the lease was taken)."""
    libfuse_314 = {"suid", "nosuid", "dev", "nodev", "exec", "noexec", "atime", "noatime",
                   "sync", "async", "allow_other", "allow_root", "auto_unmount"}
    for g in options.GENERIC:
        for name in g.names:
            opt = name.replace("*", "systemd.automount").replace("=", "=x")
            if g.action == options.REFUSED:
                with pytest.raises(UsageError, match=f"'{re.escape(opt)}' is refused: "):
                    parse("-o", opt)
            elif opt == "remount":  # mount(8)'s, through the helper
                with pytest.raises(UsageError, match="mount -o remount,ro MOUNTPOINT"):
                    parse("-o", opt)
            else:
                assert parse("-o", opt).fuse_options <= libfuse_314, opt


@pytest.mark.cli
def test_command_line_values_are_checked_even_where_a_flag_wins() -> None:
    with pytest.raises(UsageError, match="-o cache_size 'big' is not a size"):
        parse("--cache-size", "1G", "-o", "cache_size=big")


@pytest.mark.cli
def test_run_takes_the_mount_options_and_their_variables() -> None:
    args = build_parser().parse_args(["run", "--mount", "s3://bucket/ws", "/mnt",
                                      "-o", "fsync=remote", "--", "true"])
    options.resolve(args, {"WSFS_CACHE_SIZE": "3G", "WSFS_FSYNC": "local"})
    assert (args.cache_size, args.fsync) == (3 << 30, True)


@pytest.mark.cli
def test_store_commands_take_endpoint_and_region_from_the_environment() -> None:
    args = build_parser().parse_args(["fsck", "s3://bucket/ws", "--region", "sbg"])
    options.resolve(args, {"WSFS_ENDPOINT_URL": "http://e", "WSFS_REGION": "gra"})
    assert (args.endpoint_url, args.region) == ("http://e", "sbg")


@pytest.mark.cli
def test_options_and_knobs_read_seconds_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """One parser: what --timeout refuses, a WSFS_ knob ignores for its default."""
    for text in ("1.5", "0", "1e2"):
        monkeypatch.setenv("WSFS_X", text)
        assert env_seconds("WSFS_X", 7.0) == options.parse_seconds(text, "--x") == float(text)
    for text in ("soon", "-1", "nan", "inf", ""):
        monkeypatch.setenv("WSFS_X", text)
        assert env_seconds("WSFS_X", 7.0) == 7.0
        with pytest.raises(UsageError, match=r"--x must be .* seconds, not"):
            options.parse_seconds(text, "--x")
    monkeypatch.setenv("WSFS_X", "-300")
    assert env_seconds("WSFS_X", 0.0, signed=True) == -300.0  # a clock skew
    monkeypatch.setenv("WSFS_X", "0")
    assert env_seconds("WSFS_X", 60.0, positive=True) == 60.0  # a lease's TTL


@pytest.mark.parametrize(("var", "value", "words"), [
    ("WSFS_CACHE_SIZE", "banana", "WSFS_CACHE_SIZE 'banana' is not a size"),
    ("WSFS_FLUSH_DELAY", "soon", "WSFS_FLUSH_DELAY must be a number of seconds"),
    ("WSFS_INIT", "maybe", "WSFS_INIT must be 1 or 0"),
    ("WSFS_FSYNC", "sometimes", "WSFS_FSYNC must be local or remote"),
    ("WSFS_LABELS", "novalue", "(WSFS_LABELS) must be written KEY=VALUE"),
])
def test_a_bad_variable_is_one_sentence_naming_it(ws: Workspace, var: str, value: str,
                                                   words: str) -> None:
    check_refused(attempt(ws, *mount_args(ws), env={var: value}), UsageError.exit_code, words,
                  mnt=ws.mnt)
    assert not any(ws.cache_dir.glob("*")), "a refused mount must not touch the cache dir"


def test_three_forms_and_their_precedence_through_a_real_mount(ws: Workspace) -> None:
    """The variables alone mount (cache dir, sizes); then flag > -o > variable. (A read-only
    mount is another kind of mount, with a cache dir of its own: test_views.py.)"""
    env = {"WSFS_CACHE_DIR": str(ws.cache_dir), "WSFS_CACHE_SIZE": "3G",
           "WSFS_DIRTY_LIMIT": "96M", "WSFS_FLUSH_DELAY": "1"}
    ws.env.update(env)
    ws.wsfs("mount", ws.store_url, str(ws.mnt))
    assert is_mountpoint(ws.mnt)
    status = ws.status()
    assert (status["cache_limit"], status["dirty_limit"]) == (3 << 30, 96 << 20)
    ws.unmount()
    ws.wsfs("mount", ws.store_url, str(ws.mnt), "--cache-size", "1G",
            "-o", "cache_size=2G,dirty_limit=64M,rw")
    status = ws.status()
    assert (status["cache_limit"], status["dirty_limit"]) == (1 << 30, 64 << 20)
    (ws.mnt / "f").write_text("written")
    ws.unmount()


def test_init_from_the_environment(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, f"file://{tmp_path / 'store'}",
                   env={"WSFS_INIT": "1", "WSFS_FRAMEWORK": "jax", "WSFS_LABELS": "a=1,b=2"})
    try:
        ws.mount()
        marker = json.loads((ws.mnt / ".workspace.initialized").read_text())
        assert marker["framework"] == "jax" and marker["labels"] == {"a": "1", "b": "2"}
        ws.unmount()
    finally:
        ws.teardown()


def test_the_container_script_keeps_the_precedence(ws: Workspace) -> None:
    """entrypoint.sh's WSFS_OPTIONS is -o: it beats WSFS_CACHE_SIZE, as for `wsfs mount` (the
    script turned the variables into flags, which beat -o)."""
    ep = Entrypoint(ws, "trap")
    try:
        ep.start_script({**os.environ, "WSFS_STORE": ws.store_url,
                         "WSFS_MOUNTPOINT": str(ws.mnt), "WSFS_DATA_DIR": str(ep.data),
                         "WSFS_CACHE_DIR": str(ws.cache_dir), "WSFS_CACHE_SIZE": "3G",
                         "WSFS_OPTIONS": "cache_size=64M"})
        ep.wait_ready()
        assert ws.status()["cache_limit"] == 64 << 20
        assert ep.proc is not None
        ep.proc.send_signal(signal.SIGTERM)
        assert ep.wait() == 0, ep.output()
    finally:
        ep.stop()


def s3_ws(server: S3Server, root: Path) -> Workspace:
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    server.create_bucket(bucket)
    ws = Workspace(root, f"s3://{bucket}/ws", env=server.env())
    ws.init()
    ws.env = {**keyless_env(server), **{"WSFS_RUN_DIR": ws.env["WSFS_RUN_DIR"]}}
    return ws


def test_credentials_file_and_profile_as_mount_options(secret_rclone: S3Server,
                                                       tmp_path: Path) -> None:
    """`-o credentials_file=,profile=` on `wsfs mount` (before, only the fstab helper took
    them): the keys are those of the profile in the file, nowhere else."""
    ws = s3_ws(secret_rclone, tmp_path)
    creds = tmp_path / "s3.credentials"
    creds.write_text("[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n"
                     f"[alt]\naws_access_key_id = {secret_rclone.access_key}\n"
                     f"aws_secret_access_key = {secret_rclone.secret_key}\n")
    creds.chmod(0o600)
    try:
        r = ws.wsfs(*mount_args(ws, "-o", f"credentials_file={creds}"), check=False)
        assert r.returncode == StoreError.exit_code, r.stderr  # [default]'s keys are wrong
        assert not is_mountpoint(ws.mnt)
        ws.mount("-o", f"credentials_file={creds},profile=alt")
        (ws.mnt / "f").write_text("saved")
        ws.unmount()
        ws.env["WSFS_CREDENTIALS_FILE"] = str(creds)  # the other two forms
        ws.mount("--profile", "alt", cache_dir=ws.fresh_cache())
        assert (ws.mnt / "f").read_text() == "saved"
        ws.unmount()
    finally:
        ws.teardown()


def test_credentials_file_readable_by_others_is_refused_by_wsfs_mount(ws: Workspace,
                                                                      tmp_path: Path) -> None:
    creds = tmp_path / "open.credentials"
    creds.write_text("[default]\n")
    creds.chmod(0o644)
    for extra, env in ((["--credentials-file", str(creds)], {}),
                       (["-o", f"credentials_file={creds}"], {}),
                       ([], {"WSFS_CREDENTIALS_FILE": str(creds)})):
        check_refused(attempt(ws, *mount_args(ws, *extra), env=env), UsageError.exit_code,
                      "chmod 600", mnt=ws.mnt)


# -- the docs ---------------------------------------------------------------------------------

@pytest.mark.cli
def test_the_user_guide_table_is_the_code_table() -> None:
    guide = (ROOT / "docs" / "user-guide.md").read_text()
    assert options.markdown_table() in guide, (
        "docs/user-guide.md's options table differs from wsfs/commands/options.py: paste the "
        "output of `python -m wsfs.commands.options` over it")
    assert options.generic_markdown_table() in guide, (
        "docs/user-guide.md's table of mount(8)'s options differs from wsfs/commands/options.py: "
        "paste the output of `python -m wsfs.commands.options` over it")


# -- help texts -------------------------------------------------------------------------------

def help_entries(text: str) -> list[str]:
    """Each option's or positional's help entry, its wrapped lines joined."""
    entries: list[str] = []
    for line in text.split("\n\n", 2)[-1].splitlines():
        if re.match(r"  \S", line):
            entries.append(line.strip())
        elif line.startswith("      ") and entries:
            entries[-1] += " " + line.strip()
    return entries


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.cli
def test_every_argument_has_a_help() -> None:
    for command, parser in subparsers().items():
        for action in parser._actions:
            assert action.help, f"wsfs {command}: {action.dest} has no help"


@pytest.mark.cli
@pytest.mark.parametrize("command", ["", *sorted(subparsers())])
def test_every_help_reads_well(command: str) -> None:
    """A description of its own (not a module docstring), no default shown twice or shown
    as None/False/[]."""
    out = run_wsfs(*([command] if command else []), "--help").stdout
    assert "The command line: argument parsing" not in out
    assert not re.search(r"\(default: (None|False|\[\])\)", out), out
    for entry in help_entries(out):
        assert entry.count("(default") <= 1, entry
    if "--endpoint-url" in out:  # every command that opens a store: its variables
        assert "WSFS_ENDPOINT_URL" in out and "WSFS_REGION" in out, out
    description = out.split("\n\n")[1]
    assert description[0].isupper() or description.startswith("wsfs "), out


@pytest.mark.cli
def test_mount_help_explains_mountpoint_and_lists_the_variables() -> None:
    out = run_wsfs("mount", "--help").stdout
    entry = next(e for e in help_entries(out) if e.startswith("MOUNTPOINT"))
    assert "empty directory" in entry
    for name in options.MOUNT:
        assert options.BY_NAME[name].env in out, name
    assert "examples:" in out and "WSFS_CACHE_SIZE=SIZE" in out


def mount_helper(*argv: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from wsfs.commands.mounthelper import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env=dict(os.environ))


@pytest.mark.cli
@pytest.mark.parametrize("prog", ["/sbin/mount.fuse.wsfs", "/sbin/umount.fuse.wsfs"])
def test_mount_helper_help_and_version(prog: str) -> None:
    for flag in ("--version", "-V"):
        r = mount_helper(prog, flag)
        assert r.returncode == 0 and r.stdout.strip().endswith(f"(wsfs {__version__})"), r
    for flag in ("-h", "--help"):
        r = mount_helper(prog, flag)
        assert r.returncode == 0 and "usage:" in r.stdout and r.stderr == "", r
