"""Helpers to run a real ComfyUI (the newest tree, or the 0.3.75 floor) in tests. Not a test module.

    comfyui_path() -> Path                       # the ComfyUI under test (see its docstring)
    newest_comfyui_path() / floor_comfyui_path() -> Path   # the two `make test` runs on
    comfyui_version(path=None) -> (0, 30, 0)
    import_comfy(path=None, extra_modules=(...), cpu=True) -> module   # in-process `comfy`
    load_comfy_nodes(path=None, cpu=True) -> dict  # in-process nodes + comfy_extras (no custom nodes)
    stubs_needed() -> list[str]                  # torchvision / torchaudio stand-ins this venv needs
    with ComfyServer(checkpoints=[...], loras=[...], extra_models={"hywu": [...]}, custom_nodes=[...]) as srv:
        srv.url                                  # http://127.0.0.1:<port>
        srv.base_dir / srv.input_dir / srv.output_dir / srv.models_dir
        srv.object_info(node_class=None) -> dict
        srv.queue(prompt_api_dict, client_id=None) -> prompt_id    # raises PromptRejected on 400
        srv.wait(prompt_id, timeout=300, raise_on_error=True) -> history entry dict
        srv.run(prompt_api_dict, timeout=300) -> history entry      # queue + wait
        srv.output_images(history_entry) -> list[Path]
        srv.put_input(src_path_or_PIL_image, name=None) -> name    # into input dir, for LoadImage
        srv.log_tail(n=4000) -> str
        srv.pack_import_error() -> str | None      # None when custom_nodes/ComfyUI-HY-WU imported
        srv.custom_node_import_failures() -> list[str]
        srv.execution_error(history_entry) -> dict | None   # the execution_error message data
        srv.rss(field="VmRSS") -> int              # the server's resident memory (bytes); "VmHWM": peak
        srv.reset_peak_rss() -> bool               # peak := current (Linux clear_refs)
        ComfyServer.execution_seconds(history_entry) -> float

The server is started as ``python main.py --cpu --listen 127.0.0.1 --port <free>
--base-directory <tmp>`` with the repo symlinked as ``<tmp>/custom_nodes/ComfyUI-HY-WU`` and
model files symlinked into ``<tmp>/models/<folder>/`` (``custom_nodes``: more node folders linked
next to the pack, e.g. tests/comfy_test_nodes). It runs in its own process group and
is always killed on exit. stdout/stderr go to ``<tmp>/comfyui.log``; its tail is attached
to every error raised here.

torchvision, torchaudio: ComfyUI imports them at module level (model files no family here
runs), but no wheel of either matches the CPU torch here. When one cannot be imported, its
import-only stand-in in ``tests/stubs`` (raises if used) takes its place: on the server's
PYTHONPATH, and in-process only while `comfy` is imported (then removed from sys.modules so
transformers/diffusers never see it).

Each server gets the frontend its ComfyUI pins (``--front-end-root`` when the venv has another).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
STUBS = REPO / "tests" / "stubs"
PACK_NAME = "ComfyUI-HY-WU"


def _checkout(p) -> Path:
    p = Path(p).resolve()
    if not (p / "main.py").is_file():
        raise FileNotFoundError(f"ComfyUI not found at {p}: run scripts/setup_comfyui.sh or set COMFYUI_PATH")
    return p


def floor_comfyui_path() -> Path:
    """ComfyUI 0.3.75, the floor: <repo>/.cache/comfyui (scripts/setup_comfyui.sh)."""
    return _checkout(REPO / ".cache" / "comfyui")


def newest_comfyui_path() -> Path:
    """$COMFYUI_PATH, else the newest tree scripts/setup_comfyui.sh set up (<repo>/.cache/comfyui-newest,
    a copy of ../shared/comfyui/0.30.0), else the floor."""
    if os.environ.get("COMFYUI_PATH"):
        return _checkout(os.environ["COMFYUI_PATH"])
    newest = REPO / ".cache" / "comfyui-newest"
    return _checkout(newest) if (newest / "main.py").is_file() else floor_comfyui_path()


def comfyui_path() -> Path:
    """The ComfyUI the tests run on: the floor when HYWU_COMFYUI=floor (`make test`'s second pass),
    else the newest."""
    return floor_comfyui_path() if os.environ.get("HYWU_COMFYUI") == "floor" else newest_comfyui_path()


def comfyui_version(path=None) -> tuple[int, ...]:
    """(0, 30, 0) for a checkout (its comfyui_version.py)."""
    text = (Path(path or comfyui_path()) / "comfyui_version.py").read_text()
    return tuple(int(x) for x in text.split('__version__ = "', 1)[1].split('"', 1)[0].split("."))


def frontend_root(path) -> Path | None:
    """The static files of the frontend a checkout pins when the venv has another version
    (scripts/setup_comfyui.sh unpacks it into .cache/frontends/<version>), else None."""
    from importlib.metadata import PackageNotFoundError, version

    pin = next((line.split("==", 1)[1].strip() for line in (Path(path) / "requirements.txt").read_text().splitlines()
                if line.startswith("comfyui-frontend-package==")), None)
    try:
        installed = version("comfyui-frontend-package")
    except PackageNotFoundError:
        installed = None
    root = REPO / ".cache" / "frontends" / str(pin)
    return root if pin and pin != installed and (root / "index.html").is_file() else None


STUBBED = ("torchvision", "torchaudio")
_IMPORTABLE: dict[str, bool] = {}


def stubs_needed() -> list[str]:
    """The packages of STUBBED that cannot be imported here (each checked in a subprocess once):
    tests/stubs stands in for them."""
    for name in STUBBED:
        if name not in _IMPORTABLE:
            _IMPORTABLE[name] = importlib.util.find_spec(name) is not None and subprocess.run(
                [sys.executable, "-c", f"import {name}"], capture_output=True).returncode == 0
    return [n for n in STUBBED if not _IMPORTABLE[n]]


_STUB_DIR = None


def stub_dir() -> Path | None:
    """A folder holding only the stubs this venv needs (a real package is never shadowed), for
    sys.path / PYTHONPATH; None when none is needed."""
    global _STUB_DIR
    names = stubs_needed()
    if names and _STUB_DIR is None:
        d = Path(tempfile.mkdtemp(prefix="hywu_stubs_"))
        for name in (*names, "hywu_import_only.py"):
            (d / name).symlink_to(STUBS / name)
        _STUB_DIR = d
    return _STUB_DIR if names else None


@contextlib.contextmanager
def _stubs_in_sys_modules():
    names = [n for n in stubs_needed() if n not in sys.modules]
    if not names:
        yield
        return
    # Settle transformers'/diffusers' availability checks before the stubs are visible.
    for mod in ("transformers", "diffusers"):
        with contextlib.suppress(Exception):
            importlib.import_module(mod + ".utils.import_utils")
    sys.path.insert(0, str(stub_dir()))
    try:
        for name in names:
            importlib.import_module(name)
        yield
    finally:
        sys.path.remove(str(stub_dir()))
        for k in [k for k in sys.modules if k.split(".")[0] in (*names, "hywu_import_only")]:
            del sys.modules[k]


def import_comfy(path: str | os.PathLike | None = None, extra_modules=("comfy.sd", "comfy.utils",
                                                                        "comfy.model_management"),
                 cpu: bool = True):
    """Import ComfyUI's `comfy` package in this process (no server).

    Puts the ComfyUI checkout first on sys.path, disables its argv parsing, sets ``--cpu``
    (default; fp32 on CPU keeps parity checks exact; ``cpu=False`` uses CUDA when torch has it;
    only effective before comfy.model_management is first imported), and imports
    `extra_modules` (add "nodes" / "folder_paths" as needed). Returns the `comfy` package.
    """
    p = str(Path(path).resolve() if path else comfyui_path())
    if p not in sys.path:
        sys.path.insert(0, p)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    import torch

    if cpu or not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    with _stubs_in_sys_modules():
        for m in extra_modules:
            importlib.import_module(m)
    return sys.modules["comfy"]


def load_comfy_nodes(path: str | os.PathLike | None = None, cpu: bool = True) -> dict:
    """In-process: import ComfyUI's `nodes` and register the built-in comfy_extras nodes
    (InstructPixToPixConditioning, SaveLoRA, LoraModelLoader, ...) without custom nodes or API
    nodes. Returns nodes.NODE_CLASS_MAPPINGS. Idempotent."""
    import asyncio

    import_comfy(path, extra_modules=("comfy.sd", "folder_paths", "nodes"), cpu=cpu)
    import nodes

    if not getattr(nodes, "_hywu_extras_loaded", False):
        with _stubs_in_sys_modules():
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        nodes._hywu_extras_loaded = True
    return nodes.NODE_CLASS_MAPPINGS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyError(RuntimeError):
    """A ComfyUI request or execution failed; message carries the node error and log tail."""


class PromptRejected(ComfyError):
    """POST /prompt answered 400 (validation). `.response` is the decoded JSON body."""

    def __init__(self, msg, response):
        super().__init__(msg)
        self.response = response


class ExecutionFailed(ComfyError):
    """The prompt ran and failed. `.entry` is the history entry, `.error` the execution_error data."""

    def __init__(self, msg, entry, error):
        super().__init__(msg)
        self.entry = entry
        self.error = error


class ComfyServer:
    """Context manager around a headless ComfyUI server. See module docstring."""

    def __init__(self, checkpoints=(), loras=(), extra_models=None, comfy_path=None,
                 link_pack=True, extra_args=(), startup_timeout=180, base_dir=None, env=None, custom_nodes=(), cpu=True):
        self.comfy_path = Path(comfy_path).resolve() if comfy_path else comfyui_path()
        self.cpu = cpu  # False: ComfyUI picks the GPU as it would for a user (bench/gpu_comfy.py)
        self.models = {"checkpoints": list(checkpoints), "loras": list(loras)}
        for k, v in (extra_models or {}).items():
            self.models.setdefault(k, []).extend(v)
        self.link_pack = link_pack
        self.custom_nodes = [Path(p).resolve() for p in custom_nodes]
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self._own_tmp = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="hywu_comfy_")).resolve()
        self.env = dict(env or {})
        self.port = None
        self.proc = None
        self.log_path = self.base_dir / "comfyui.log"
        self._log = None
        self.start_seconds = None
        self.client_id = uuid.uuid4().hex

    # ---- paths
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    def log_tail(self, n=4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # ---- lifecycle
    def _prepare(self):
        for d in ("custom_nodes", "input", "output", "temp", "user", "models"):
            (self.base_dir / d).mkdir(parents=True, exist_ok=True)
        # Skip the first-start "Templates" dialog / tutorial in the frontend.
        settings = self.base_dir / "user" / "default" / "comfy.settings.json"
        if not settings.exists():
            settings.parent.mkdir(parents=True, exist_ok=True)
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
        if self.link_pack:
            link = self.base_dir / "custom_nodes" / PACK_NAME
            if not link.exists():
                link.symlink_to(REPO, target_is_directory=True)
        for node_dir in self.custom_nodes:
            link = self.base_dir / "custom_nodes" / node_dir.name
            if not link.exists():
                link.symlink_to(node_dir, target_is_directory=True)
        for folder, files in self.models.items():
            d = self.models_dir / folder
            d.mkdir(parents=True, exist_ok=True)
            for f in files:
                f = Path(f).resolve()
                dst = d / f.name
                if not dst.exists():
                    dst.symlink_to(f)

    def start(self):
        self._prepare()
        self.port = free_port()
        env = os.environ.copy()
        # OpenMP threads that spin-wait on cores other jobs share made the server up to 10x slower here
        # (a 1.1 s prompt took 10-14 s at load 6 on 2 cores); passive waiting only changes the timing.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        if stub_dir():
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stub_dir()), env.get("PYTHONPATH")]))
        fe = frontend_root(self.comfy_path)
        cmd = [sys.executable, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1", "--port", str(self.port),
               *(["--front-end-root", str(fe)] if fe else []),
               "--base-directory", str(self.base_dir), "--disable-auto-launch",
               "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}",
               *self.extra_args]
        self._log = open(self.log_path, "ab")
        t0 = time.time()
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_path, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = t0 + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise ComfyError(f"ComfyUI exited with {self.proc.returncode} during startup\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                self.stop()
                raise ComfyError(f"ComfyUI did not answer /system_stats in {self.startup_timeout}s\n{self.log_tail()}")
            time.sleep(0.25)
        self.start_seconds = time.time() - t0
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self):
        self.stop()
        if self._own_tmp and os.environ.get("HYWU_KEEP_COMFY_DIR") != "1":
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc):
        self.cleanup()
        return False

    def rss(self, field: str = "VmRSS") -> int:
        """Resident memory of the server process in bytes (Linux /proc); "VmHWM" is the peak."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise ComfyError(f"no {field} for the server process")

    def reset_peak_rss(self) -> bool:
        """Set the peak (VmHWM) to the current RSS, so rss("VmHWM") is the peak from now on."""
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    @staticmethod
    def execution_seconds(entry: dict) -> float:
        """A history entry's execution time on the server (execution_start..execution_success)."""
        ts = {name: data.get("timestamp") for name, data in entry["status"]["messages"]}
        return (ts["execution_success"] - ts["execution_start"]) / 1000.0

    def custom_node_import_failures(self) -> list[str]:
        """Custom-node folders ComfyUI reported as "(IMPORT FAILED)" in its startup log."""
        out = []
        for line in self.log_tail(10**7).splitlines():
            if "(IMPORT FAILED)" in line:
                out.append(line.split("(IMPORT FAILED):", 1)[-1].strip())
        return out

    def pack_import_error(self) -> str | None:
        """None if custom_nodes/ComfyUI-HY-WU imported; else the log text around its failure."""
        log = self.log_tail(10**7)
        marker = f"Cannot import {self.base_dir / 'custom_nodes' / PACK_NAME}"
        i = log.find(marker)
        if i < 0 and not any(PACK_NAME in f for f in self.custom_node_import_failures()):
            return None
        j = log.rfind("Traceback", 0, i) if i >= 0 else -1
        if i < 0:
            return "IMPORT FAILED (see log)\n" + self.log_tail()
        end = log.find("\n", i)
        return log[max(j, i - 6000, 0): end if end > 0 else None]

    # ---- API
    def _get(self, path, **kw):
        r = requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)
        if not r.ok:
            raise ComfyError(f"GET {path} -> {r.status_code}: {r.text[:2000]}\n{self.log_tail()}")
        return r

    def object_info(self, node_class: str | None = None) -> dict:
        path = "/object_info" + (f"/{node_class}" if node_class else "")
        return self._get(path, timeout=60).json()

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        body = {"prompt": prompt, "client_id": client_id or self.client_id}
        r = requests.post(self.url + "/prompt", json=body, timeout=60)
        if r.status_code != 200:
            try:
                data = r.json()
            except ValueError:
                data = {"raw": r.text}
            raise PromptRejected(f"POST /prompt -> {r.status_code}: {json.dumps(data, indent=1)[:6000]}\n"
                                 f"--- ComfyUI log tail ---\n{self.log_tail()}", data)
        return r.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300, raise_on_error: bool = True) -> dict:
        """Poll /history until the prompt finished. Returns the history entry
        ({"prompt", "outputs", "status": {"status_str", "completed", "messages"}, ...})."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI died (rc {self.proc.returncode})\n{self.log_tail()}")
            h = self._get(f"/history/{prompt_id}").json()
            if prompt_id in h:
                entry = h[prompt_id]
                st = entry.get("status") or {}
                if st.get("completed") or st.get("status_str") in ("success", "error"):
                    if st.get("status_str") == "error" and raise_on_error:
                        err = self.execution_error(entry) or {}
                        raise ExecutionFailed(
                            f"prompt {prompt_id} failed in node {err.get('node_id')} "
                            f"({err.get('node_type')}): {err.get('exception_type')}: {err.get('exception_message')}\n"
                            f"{''.join(err.get('traceback') or [])[-3000:]}\n--- ComfyUI log tail ---\n{self.log_tail()}",
                            entry, err)
                    return entry
            time.sleep(0.2)
        raise ComfyError(f"prompt {prompt_id} not finished after {timeout}s\n{self.log_tail()}")

    @staticmethod
    def execution_error(entry: dict) -> dict | None:
        for name, data in (entry.get("status") or {}).get("messages", []):
            if name == "execution_error":
                return data
        return None

    def run(self, prompt: dict, timeout: float = 300, raise_on_error: bool = True) -> dict:
        return self.wait(self.queue(prompt), timeout=timeout, raise_on_error=raise_on_error)

    def output_images(self, entry: dict) -> list[Path]:
        out = []
        for node_out in (entry.get("outputs") or {}).values():
            for img in node_out.get("images", []):
                root = {"output": self.output_dir, "temp": self.base_dir / "temp",
                        "input": self.input_dir}[img.get("type", "output")]
                out.append(root / img.get("subfolder", "") / img["filename"])
        return out

    def put_input(self, src, name: str | None = None) -> str:
        """Copy an image file (or save a PIL image) into the input dir; returns the name LoadImage takes."""
        self.input_dir.mkdir(parents=True, exist_ok=True)
        if hasattr(src, "save"):
            name = name or f"hywu_{uuid.uuid4().hex[:8]}.png"
            src.save(self.input_dir / name)
        else:
            src = Path(src)
            name = name or src.name
            shutil.copyfile(src, self.input_dir / name)
        return name


if __name__ == "__main__":  # for the Makefile: `python tests/comfy_harness.py newest|floor|floor-version`
    what = sys.argv[1] if len(sys.argv) > 1 else "newest"
    if what == "floor-version":
        print(".".join(map(str, comfyui_version(floor_comfyui_path()))))
    else:
        print(floor_comfyui_path() if what == "floor" else newest_comfyui_path())
