"""One-call GPU check: the CUDA path that CPU CI cannot run, in one command that writes one JSON.

    bash benchmarks/gpu_check.sh                                 # on a GPU box: carried wheels, then this
    python benchmarks/gpu_check.py --out runs/gpu_check/gpu_check.json   # one H200: <= 8 minutes
    python benchmarks/gpu_check.py --smoke --hide ray,datasets,wandb,mlflow   # tiny shapes on the CPU (what CI runs)

Sections, in order (gpu_check_sections/__init__.py has each one's limits, its module its checks):
environment, train_step, bf16_vs_fp32, torch_sampler, megatron_engine (CUDA), refit_broadcast,
reward_encoder, train_step_1p5b, cli_train, cli_train_megatron_engine (CUDA).

A GPU lease is one shot, so nothing here may lose results:
* every section runs in its own process (a CUDA fault, a hang or megatron's global state stay
  inside it), killed with its process group at its wall limit;
* a section saves its metrics and checks after each one, a failing sub-check is recorded and the
  section goes on, an exception is recorded with its type, message and traceback tail;
* this JSON is rewritten after every section (and before each, marking it `running`), so a run
  cut short by the runner's timeout still leaves everything that finished;
* an overall budget (`--budget-s`): a section starts only with MIN_START_S left, and its limit is
  cut to what is left.

Statuses: ok (every check passed), fail (a check failed), error (an exception escaped), timeout,
`skipped: needs CUDA`, `skipped: out of time budget`, pending (not reached: the run was stopped).
Exit code 0 when every section is ok or skipped for want of CUDA, else 1.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (str(REPO), str(HERE)):  # nemo_rlsr from this checkout; the sections package beside this file
    if _path not in sys.path:
        sys.path.insert(0, _path)

from gpu_check_sections import BY_NAME, SECTIONS, Options, run_section  # noqa: E402
from gpu_check_sections.hidden import hide_packages  # noqa: E402
from gpu_check_sections.record import SectionRecord, write_json  # noqa: E402

FULL_BUDGET_S = 400.0  # gpu_check.sh stops the run at 450 s; with the wheels' install: < 8 minutes
SMOKE_BUDGET_S = 1500.0
MIN_START_S = 15.0  # less than this left: a section's imports alone would not finish
LOG_TAIL_LINES = 40
OK_STATUSES = ("ok", "skipped: needs CUDA")
DEBUG_MODES = ("raise", "stall")


class Stopped(Exception):
    """The driver got SIGTERM or SIGINT (the runner's outer timeout, or Ctrl-C)."""


def section_time_limit(limit_s: float, remaining_s: float, min_start_s: float = MIN_START_S) -> float | None:
    """The next section's wall limit: its own, cut to what is left of the budget; None when less than
    `min_start_s` is left (it would only be killed half-way)."""
    if remaining_s < min_start_s:
        return None
    return min(limit_s, remaining_s)


def _assignments(items: list[str], flag: str, parser: argparse.ArgumentParser) -> dict[str, str]:
    result = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in BY_NAME or not value:
            parser.error(f"{flag} {item!r}: expected SECTION=VALUE with SECTION one of {', '.join(BY_NAME)}")
        result[name] = value
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check" / "gpu_check.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, on the CPU (what CI runs)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"overall wall budget (default {FULL_BUDGET_S:.0f}; --smoke {SMOKE_BUDGET_S:.0f})")
    parser.add_argument("--sections", default=None, help="comma-separated subset (default: all, in order)")
    parser.add_argument("--hide", default="", help="packages to make look absent, e.g. ray,datasets,wandb,mlflow "
                                                   "(the GPU box has none): the run imports only what the box can")
    parser.add_argument("--limit-s", action="append", default=[], metavar="SECTION=SECONDS",
                        help="override one section's wall limit")
    parser.add_argument("--debug-fail", action="append", default=[], metavar="SECTION=raise|stall",
                        help="rehearse a failure after the section's body: raise, or hang until killed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.selected = [s.name for s in SECTIONS] if args.sections is None else args.sections.split(",")
    unknown = [name for name in args.selected if name not in BY_NAME]
    if unknown:
        parser.error(f"--sections: unknown {unknown}; sections are {', '.join(BY_NAME)}")
    args.limits = {k: float(v) for k, v in _assignments(args.limit_s, "--limit-s", parser).items()}
    args.debug = _assignments(args.debug_fail, "--debug-fail", parser)
    if any(mode not in DEBUG_MODES for mode in args.debug.values()):
        parser.error(f"--debug-fail: the mode is one of {DEBUG_MODES}")
    args.hidden = tuple(name for name in args.hide.split(",") if name)
    return args


# ---- one section, in its own process -------------------------------------------------------------


def child_main(args: argparse.Namespace) -> None:
    hide_packages(list(args.hidden))
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rec = SectionRecord(args.child_out)
    try:
        run_section(args.child, rec, Options(smoke=args.smoke, hidden=args.hidden))
        mode = args.debug.get(args.child)
        if mode == "raise":
            raise RuntimeError(f"--debug-fail {args.child}=raise")
        if mode == "stall":
            time.sleep(10**6)
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON; the driver goes on
        rec.finish(exc)
    else:
        rec.finish()
    # Everything is on disk: leave without interpreter teardown, where a process group or a
    # library's exit hook could hang and cost the section its limit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _echo(stream, name: str, tail: collections.deque) -> None:
    for line in stream:
        sys.stdout.write(f"[{name}] {line}")
        sys.stdout.flush()
        tail.append(line.rstrip("\n"))


def _kill(proc: subprocess.Popen) -> None:
    """TERM the section's whole process group (CLI runs are grandchildren), KILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _child_command(args: argparse.Namespace, name: str, out: Path) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--child-out", str(out),
               "--hide", ",".join(args.hidden)]
    if args.smoke:
        command.append("--smoke")
    if name in args.debug:
        command += ["--debug-fail", f"{name}={args.debug[name]}"]
    return command


def run_child(args: argparse.Namespace, name: str, limit_s: float, workdir: Path, entry: dict) -> None:
    """Run section `name` in a process, at most `limit_s`; fill `entry` with what it recorded.
    Re-raises Stopped after recording what the section had when the whole run was stopped."""
    out = workdir / f"{name}.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # tiny shapes on the CPU, also on a GPU machine
    start = time.monotonic()
    proc = subprocess.Popen(_child_command(args, name, out), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    tail: collections.deque = collections.deque(maxlen=LOG_TAIL_LINES)
    reader = threading.Thread(target=_echo, args=(proc.stdout, name, tail), daemon=True)
    reader.start()
    timed_out, stopped = False, None
    try:
        proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    except Stopped as exc:
        stopped = exc
    finally:
        if proc.poll() is None:
            _kill(proc)
    reader.join(timeout=10)
    recorded = json.loads(out.read_text()) if out.exists() else {"status": "running", "metrics": {}, "checks": {},
                                                                 "error": None}
    entry.update(recorded, seconds=round(time.monotonic() - start, 2), exit_code=proc.returncode)
    if (stopped is not None or timed_out) and entry["status"] != "running":
        entry["note"] = "the section had finished; its process was killed on its way out"
    elif stopped is not None or timed_out:
        why = f"the whole check was stopped ({stopped})" if stopped else f"its {limit_s:.0f} s limit"
        entry.update(status="timeout", error={"type": "Timeout", "message": f"killed at {why}; metrics and checks "
                                              f"are those it had recorded", "traceback_tail": []})
    elif entry["status"] == "running":  # the process died without writing a result: a crash
        entry.update(status="error", error={"type": "ProcessDied", "message": f"the section's process exited with "
                                            f"code {proc.returncode} before finishing (see log_tail)",
                                            "traceback_tail": []})
    if entry["status"] != "ok":
        entry["log_tail"] = list(tail)
    if stopped is not None:
        raise stopped


# ---- the driver ------------------------------------------------------------------------------------


def code_identity() -> dict:
    """Which code produced the numbers: the git commit where there is a .git (the device machine
    gets a copy of the working tree, maybe without one) and a digest of the sources either way."""
    digest = hashlib.sha256()
    for folder in ("nemo_rlsr", "benchmarks", "conf"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix in (".py", ".yaml", ".sh") and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    identity = {"sources_sha256": digest.hexdigest()}
    try:
        git = ["git", "-C", str(REPO)]
        identity["git_commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                                timeout=10, check=True).stdout.strip()
        identity["git_dirty"] = bool(subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        identity["git_commit"] = None
    return identity


def _save(args: argparse.Namespace, report: dict, started: float) -> None:
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    statuses = [entry["status"] for entry in report["sections"].values()]
    report["summary"] = {status: statuses.count(status) for status in dict.fromkeys(statuses)}
    write_json(args.out, report)


def _result_line(entry: dict) -> str:
    if entry["status"] == "ok":
        return str(entry.get("metrics", {}).get("headline", f"{len(entry.get('checks', {}))} checks ok"))
    failed = [f"{name}: {check.get('detail') or check.get('error', {}).get('message', '')}"
              for name, check in entry.get("checks", {}).items() if not check["ok"]]
    error = entry.get("error") or {}
    text = "; ".join(failed) or f"{error.get('type', '')}: {error.get('message', '')}".strip(": ")
    return text.replace("\n", " ")[:160]


def print_table(report: dict) -> None:
    print(f"\n== GPU check ({report['mode']}): {report['summary']} in {report['elapsed_s']} s -> {report['out']}")
    print(f"{'section':28s}{'status':28s}{'seconds':>8s}  result")
    for name, entry in report["sections"].items():
        seconds = f"{entry['seconds']:.1f}" if "seconds" in entry else "-"
        print(f"{name:28s}{entry['status']:28s}{seconds:>8s}  {_result_line(entry)}")


def run_check(args: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    budget = args.budget_s or (SMOKE_BUDGET_S if args.smoke else FULL_BUDGET_S)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report = {"check": "nemo_rlsr GPU check (benchmarks/gpu_check.py)", "mode": "smoke" if args.smoke else "full",
              "complete": False, "out": str(args.out), "started_utc": datetime.datetime.now(datetime.timezone.utc)
              .isoformat(timespec="seconds"), "budget_s": budget, "argv": sys.argv[1:], "cuda": cuda,
              "hidden_packages": list(args.hidden), "code": code_identity(),
              "sections": {name: {"status": "pending", "needs_cuda": BY_NAME[name].needs_cuda,
                                  "what": BY_NAME[name].what} for name in args.selected}}
    _save(args, report, started)

    def stop(signum, frame):
        raise Stopped(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        for name in args.selected:
            section, entry = BY_NAME[name], report["sections"][name]
            if section.needs_cuda and not cuda:
                entry["status"] = "skipped: needs CUDA"
                _save(args, report, started)
                continue
            own = args.limits.get(name, section.smoke_limit_s if args.smoke else section.limit_s)
            limit = section_time_limit(own, budget - (time.monotonic() - started))
            if limit is None:
                entry["status"] = "skipped: out of time budget"
                _save(args, report, started)
                continue
            entry.update(status="running", limit_s=round(limit, 1),
                         started_at_s=round(time.monotonic() - started, 1))
            _save(args, report, started)
            run_child(args, name, limit, workdir, entry)
            _save(args, report, started)
        report["complete"] = True
    except Stopped as stop:
        for entry in report["sections"].values():
            if entry["status"] == "running":  # stopped between its start and its process
                entry.update(status="timeout", error={"type": "Timeout", "message": f"the whole check was stopped "
                                                      f"({stop})", "traceback_tail": []})
        print("gpu_check: stopped; the JSON holds every section that had finished", file=sys.stderr)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _save(args, report, started)
    print_table(report)
    return 0 if report["complete"] and all(e["status"] in OK_STATUSES for e in report["sections"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args)  # does not return
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
