"""The `pets` command line: compile, run, tasks, export-onnx, demo. Errors print one line and exit non-zero."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pets_compiler.errors import ExportError, InputError, PetsError
from pets_compiler.frontend.finetune import DEFAULT_MAX_DENSITY


def _task_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pets", description="Serve many PET-tuned BERT tasks from one backbone.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a base checkpoint and task sources into an artifact dir")
    c.add_argument("base", type=Path, help="Hugging Face BERT checkpoint dir (config, safetensors, tokenizer)")
    c.add_argument("--task", action="append", type=_task_arg, default=[], metavar="NAME=PATH", required=True)
    c.add_argument("-o", "--output", type=Path, required=True, help="artifact directory to write")
    c.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    c.add_argument(
        "--sites",
        choices=["used", "all"],
        default="used",
        help="attach task ops at the sites these tasks use (fastest) or at every site (any later task fits)",
    )
    c.add_argument(
        "--max-density",
        type=float,
        default=DEFAULT_MAX_DENSITY,
        help="most a fine-tune may change of a weight matrix to be served as a sparse (diff / mask) task",
    )
    c.add_argument("--report", action="store_true", help="print what each graph pass changed")

    r = sub.add_parser("run", help="answer JSONL requests with an artifact (or an exported ONNX model)")
    r.add_argument("artifact", type=Path, help="artifact dir, or with --backend onnxruntime a `pets export-onnx` model")
    r.add_argument("--input", type=Path, required=True, help="JSONL: {'task': NAME, 'text'|'input_ids': ...}")
    r.add_argument("--output", type=Path, help="JSONL answers in input order (default: stdout)")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--device", default="cpu", help="where to serve: cpu, cuda, cuda:1, ...")
    r.add_argument(
        "--backend",
        choices=["pets", "onnxruntime"],
        default="pets",
        help="pets: the artifact's runtime; onnxruntime: an exported model (CUDA if onnxruntime-gpu is installed)",
    )
    r.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="on CUDA, run the program op by op instead of replaying captured CUDA graphs (the default there)",
    )
    r.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the program before serving (compiling takes a minute or more)",
    )

    t = sub.add_parser("tasks", help="list, add or remove the tasks of an artifact")
    t.add_argument("artifact", type=Path)
    ts = t.add_subparsers(dest="action", required=True)
    ts.add_parser("list")
    ta = ts.add_parser("add")
    ta.add_argument("task", type=_task_arg, metavar="NAME=PATH")
    tr = ts.add_parser("remove")
    tr.add_argument("name")

    e = sub.add_parser("export-onnx", help="export an artifact's tasks as one ONNX model for onnxruntime")
    e.add_argument("artifact", type=Path)
    e.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
    e.add_argument("--opset", type=int, default=20, help="ONNX opset, 18 to 23 (default 20)")

    d = sub.add_parser("demo", help="the whole chain on the bundled MiniLM checkpoint")
    d.add_argument("--workdir", type=Path, help="where to write the demo tasks and artifact (default: a temp dir)")
    return p


def _read_jsonl(path: Path) -> list[Any]:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return out


def cmd_compile(args: argparse.Namespace) -> None:
    from pets_compiler.compiler import compile

    runtime = compile(
        args.base, dict(args.task), dtype=args.dtype, sites=args.sites, max_density=args.max_density, progress=True
    )
    runtime.save(args.output)
    if args.report:
        print("\n".join(runtime.report))
    print(f"wrote {args.output} with tasks: {', '.join(runtime.task_names())}")


def _onnx_module(name: str) -> Any:
    """pets_compiler.export.NAME, which needs the `onnx` extra."""
    try:
        return importlib.import_module(f"pets_compiler.export.{name}")
    except ImportError as e:
        raise ExportError(
            f"ONNX support needs onnx, onnxruntime and onnxscript ({e}): pip install 'pets-compiler[onnx]'"
        ) from None


def cmd_export_onnx(args: argparse.Namespace) -> None:
    from pets_compiler.runtime.artifact import load

    onnx_export = _onnx_module("onnx_export")
    onnx_export.check_opset(args.opset)  # before loading anything
    path = onnx_export.export_onnx(load(args.artifact), args.output, args.opset)
    print(f"wrote {path} (opset {args.opset})")


def cmd_run(args: argparse.Namespace) -> None:
    from pets_compiler.runtime.artifact import load

    requests = _read_jsonl(args.input)
    if args.backend == "onnxruntime":
        if args.device != "cpu" or args.compile or args.no_cuda_graphs:
            raise InputError("--device, --compile and --no-cuda-graphs are for --backend pets")
        runner = _onnx_module("onnx_runner").OnnxRunner(args.artifact)
        _write_answers(runner.run(requests, batch_size=args.batch_size), args.output)
        return
    runtime = load(args.artifact)
    graphs = False if args.no_cuda_graphs else None
    if args.device != "cpu":
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(f"--device {args.device}: this torch build sees no CUDA device")
        runtime.to(args.device, cuda_graphs=graphs, compile=args.compile)
    elif args.compile:
        runtime.accelerate(compile=True)
    _write_answers(runtime.run(requests, batch_size=args.batch_size, progress=True), args.output)


def _write_answers(answers: list[dict[str, Any]], output: Path | None) -> None:
    text = "".join(json.dumps(a) + "\n" for a in answers)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)


def cmd_tasks(args: argparse.Namespace) -> None:
    from pets_compiler.runtime.artifact import load

    runtime = load(args.artifact)
    if args.action == "list":
        for name in runtime.task_names():
            spec = runtime.task(name)
            labels = f", {spec.head.num_labels} labels" if spec.head is not None else ""
            print(f"{name}\t{'+'.join(spec.kinds()) or 'base'}{labels}")
        return
    if args.action == "add":
        name, path = args.task
        runtime.add_task(name, path)
    else:
        runtime.remove_task(args.name)
    runtime.save(args.artifact)
    print(f"{args.action}: ok; tasks now: {', '.join(runtime.task_names()) or 'none'}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "compile":
            cmd_compile(args)
        elif args.command == "run":
            cmd_run(args)
        elif args.command == "tasks":
            cmd_tasks(args)
        elif args.command == "export-onnx":
            cmd_export_onnx(args)
        else:
            from pets_compiler.demo import run_demo

            return run_demo(args.workdir)
    except PetsError as e:
        print(f"pets {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
