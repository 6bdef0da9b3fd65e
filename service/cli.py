"""The ``sluice`` command: ``serve``, ``generate``, ``info``, ``health`` and ``quantize``.

Engine flags are built from ``EngineArgs`` fields (``max_num_seqs`` -> ``--max-num-seqs``),
server flags from ``ServerArgs`` and sampling flags from ``SamplingParams``, so each setting has
one source.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from engine.config import EngineArgs
from engine.sampling_params import SamplingParams
from service.client import DEFAULT_ADDRESS, SluiceClient
from service.log_format import configure_logging
from service.server import ServerArgs, serve
from sluice.v1 import generation_pb2 as pb

# Sampling flags that make no sense on the command line, which prints text only.
_CLI_SKIPPED_SAMPLING = ("logprobs", "detokenize")
# The bundled model, found in the source tree (the editable install runs from it).
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "sluice-pycoder"
# The client commands' API key, when --api-key-file is not given.
API_KEY_ENV = "SLUICE_API_KEY"

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["quantize"]:
        return _quantize(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    # The server logs its configuration and life; the one-shot commands keep stderr quiet.
    level = logging.INFO if args.command == "serve" else logging.WARNING
    try:
        configure_logging(level, getattr(args, "server.log_format", "text"))
        return args.handler(args)
    except (ValueError, OSError) as exc:  # bad settings or files: a clear message, not a traceback
        print(f"sluice {args.command}: error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description="Serve a language model over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the gRPC server")
    _add_dataclass_flags(serve, EngineArgs, "engine", optional=("model",))
    _add_dataclass_flags(serve, ServerArgs, "server")
    serve.set_defaults(handler=_serve)

    generate = commands.add_parser("generate", help="generate a completion, offline or from a server")
    generate.add_argument("prompt", help="the prompt text")
    generate.add_argument("--server", metavar="HOST:PORT", help="stream from a running server instead")
    _add_connection_flags(generate)
    _add_dataclass_flags(generate, SamplingParams, "sampling", skip=_CLI_SKIPPED_SAMPLING, unset=True)
    # Engine flags whose names a sampling flag already uses (--seed) are the sampling one here.
    _add_dataclass_flags(generate, EngineArgs, "engine", skip=("seed",), optional=("model",))
    generate.set_defaults(handler=_generate)

    for name, handler, text in (("info", _info, "describe a running server's model and load"),
                                ("health", _health, "query a running server's health")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--server", metavar="HOST:PORT", default=DEFAULT_ADDRESS)
        sub.add_argument("--timeout", type=float, default=10.0, help="seconds (default: 10)")
        _add_connection_flags(sub)
        sub.set_defaults(handler=handler)

    # `sluice quantize ...` is handed whole to the quantizer's own parser (see _quantize).
    commands.add_parser("quantize", help="quantize a checkpoint to AWQ 4-bit", add_help=False)
    return parser


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    section = parser.add_argument_group("connection options")
    section.add_argument("--api-key-file", metavar="PATH",
                         help=f"file whose first line is the API key (default: ${API_KEY_ENV})")
    section.add_argument("--tls-ca", metavar="PATH", help="PEM CA certificate: connect with TLS, trusting it")


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """``SluiceClient`` keywords from the connection flags; the key never comes from argv."""
    key = (Path(args.api_key_file).read_text().strip().splitlines() or [""])[0].strip() \
        if args.api_key_file else os.environ.get(API_KEY_ENV)
    return {"api_key": key or None,
            "root_certificates": Path(args.tls_ca).read_bytes() if args.tls_ca else None}


# ---------------------------------------------------------------------------- flags from dataclasses
def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, group: str, skip: Sequence[str] = (),
                         optional: Sequence[str] = (), unset: bool = False) -> None:
    """One ``--flag-name`` per field of ``cls``, stored as ``{group}.{field}``. ``unset``: every
    default is None, so that only the flags given are passed on."""
    hints = typing.get_type_hints(cls)
    section = parser.add_argument_group(f"{group} options")
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        kind, is_list = _flag_type(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if unset or required else (f.default if f.default is not dataclasses.MISSING
                                                   else f.default_factory())
        kwargs: dict[str, Any] = {"dest": f"{group}.{f.name}", "default": default, "metavar": f.name.upper()}
        if kind is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, metavar=None)
        elif is_list:
            kwargs.update(action="append", type=kind)
        elif kind is dict:
            kwargs.update(action="append", type=_token_bias, metavar="TOKEN_ID=BIAS")
        else:
            kwargs["type"] = kind
        kwargs["required"] = required and f.name not in optional
        kwargs["help"] = ("required" if kwargs["required"] else f"default: {DEFAULT_MODEL}" if f.name == "model"
                          else f"default: {default}")
        section.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def _flag_type(hint: Any) -> tuple[type, bool]:
    """(element type, is a list) of a field's type hint, with ``None`` stripped from unions."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is list:
        return typing.get_args(hint)[0], True
    if origin is dict:
        return dict, False
    return hint, False


def _token_bias(text: str) -> tuple[int, float]:
    token, _, bias = text.partition("=")
    try:
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS, got {text!r}") from None


def flags_of(args: argparse.Namespace, group: str) -> dict[str, Any]:
    """The flags of ``group`` ("engine", "server", "sampling") that have a value, by field name."""
    prefix = group + "."
    values = {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}
    if isinstance(values.get("logit_bias"), list):
        values["logit_bias"] = dict(values["logit_bias"])
    return values


def engine_args_of(args: argparse.Namespace) -> EngineArgs:
    """The engine flags given, with the bundled model when ``--model`` is not."""
    values = flags_of(args, "engine")
    if "model" not in values:
        values["model"] = str(DEFAULT_MODEL)
        logger.warning("no --model given: using the bundled model %s", DEFAULT_MODEL)
    return _config(EngineArgs, values)


def _config(cls: type, values: dict[str, Any]) -> Any:
    """``cls(**values)``, with a bad value reported as a usage error rather than a traceback."""
    try:
        return cls(**values)
    except ValueError as exc:
        raise SystemExit(f"sluice: {exc}") from None


# ---------------------------------------------------------------------------- commands
def _serve(args: argparse.Namespace) -> int:
    return serve(engine_args_of(args), _config(ServerArgs, flags_of(args, "server")))


def _generate(args: argparse.Namespace) -> int:
    sampling = flags_of(args, "sampling")
    if args.server:
        return _generate_remote(args.server, args.prompt, sampling, client_options(args))
    return _generate_offline(engine_args_of(args), args.prompt, _config(SamplingParams, sampling))


def _generate_offline(engine_args: EngineArgs, prompt: str, params: SamplingParams) -> int:
    """Run the engine in this process and print the text as each step produces it."""
    from engine.llm_engine import LLMEngine

    engine = LLMEngine.from_engine_args(engine_args)
    try:
        engine.add_request("0", prompt, params)
    except ValueError as exc:
        raise SystemExit(f"sluice generate: {exc}") from None
    texts = [""] * params.n
    while engine.has_unfinished_requests():
        for delta in engine.step():
            for c in delta.outputs:
                texts[c.index] += c.text
                if params.n == 1:
                    _write(c.text)
    _print_choices(texts)
    return 0


def _generate_remote(address: str, prompt: str, sampling: dict[str, Any],
                     options: dict[str, Any] | None = None) -> int:
    texts: dict[int, str] = {}
    failed = False
    with SluiceClient(address, **(options or {})) as client:
        try:
            for delta in client.generate(prompt, **sampling):
                texts[delta.index] = texts.get(delta.index, "") + delta.text
                if sampling.get("n", 1) == 1:
                    _write(delta.text)
                if delta.finish_reason == pb.FINISH_REASON_ERROR:
                    print(f"sluice generate: request failed: {delta.error.message}", file=sys.stderr)
                    failed = True
        except grpc.RpcError as exc:
            raise SystemExit(f"sluice generate: {exc.code().name}: {exc.details()}") from None
    _print_choices([texts.get(i, "") for i in range(sampling.get("n", 1))])
    return 1 if failed else 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _print_choices(texts: list[str]) -> None:
    if len(texts) == 1:
        print()
        return
    for i, text in enumerate(texts):
        print(f"--- choice {i} ---\n{text}")


def _info(args: argparse.Namespace) -> int:
    with SluiceClient(args.server, timeout=args.timeout, **client_options(args)) as client:
        info = {
            "model": MessageToDict(client.model_info(), preserving_proto_field_name=True,
                                   always_print_fields_with_no_presence=True),
            "load": MessageToDict(client.load(), preserving_proto_field_name=True,
                                  always_print_fields_with_no_presence=True),
        }
    print(json.dumps(info, indent=2))
    return 0


def _health(args: argparse.Namespace) -> int:
    """Prints the status; exit code 0 when SERVING, 1 when not, 2 when unreachable."""
    with SluiceClient(args.server, timeout=args.timeout, **client_options(args)) as client:
        try:
            status = client.health()
        except grpc.RpcError as exc:
            print(f"UNREACHABLE ({exc.code().name}: {exc.details()})")
            return 2
    print(status)
    return 0 if status == "SERVING" else 1


# ---------------------------------------------------------------------------- quantize
def _quantize(argv: list[str]) -> int:
    """``sluice quantize ...``: the AWQ quantizer's own CLI, imported only when asked for."""
    from engine.quantization.quantize_cli import main as quantize_main

    return quantize_main(argv)


if __name__ == "__main__":
    sys.exit(main())
