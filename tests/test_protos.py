"""The API contract: committed stubs match the .proto files, and the contract is documented."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from engine.sampling_params import SamplingParams
from service import gen_protos
from sluice.v1 import generation_pb2 as pb
from sluice.v1 import generation_pb2_grpc as pb_grpc

STUB_DIR = gen_protos.REPO_ROOT / "sluice" / "v1"
# GenerateRequest fields that are options of the request itself, not SamplingParams fields.
REQUEST_OPTIONS = {"request_id", "text", "token_ids", "priority", "cache_salt"}


def _descriptor_set(tmp_path: Path, source_info: bool) -> descriptor_pb2.FileDescriptorSet:
    from grpc_tools import protoc

    out = tmp_path / "descriptors.pb"
    args = ["protoc", f"-I{gen_protos.PROTO_ROOT}", f"--descriptor_set_out={out}"]
    if source_info:
        args.append("--include_source_info")
    sources = [str(p.relative_to(gen_protos.PROTO_ROOT)) for p in gen_protos.proto_files()]
    assert protoc.main(args + sources) == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _without_version_lines(text: str) -> str:
    # The generator stamps its own version; everything else must match exactly.
    return re.sub(r"^GRPC_GENERATED_VERSION = .*$", "", text, flags=re.M)


def _clear_json_names(messages) -> None:
    # Python gencode embeds descriptors without the derived json_name; drop it to compare.
    for message in messages:
        for f in message.field:
            f.ClearField("json_name")
        _clear_json_names(message.nested_type)


def test_committed_descriptor_matches_proto(tmp_path: Path) -> None:
    (fresh,) = _descriptor_set(tmp_path, source_info=False).file
    _clear_json_names(fresh.message_type)
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert committed == fresh, "sluice/v1 stubs are stale: run `python -m service.gen_protos`"


def test_committed_stub_files_match_fresh_generation(tmp_path: Path) -> None:
    fresh_dir = tmp_path / "sluice" / "v1"
    gen_protos.generate(tmp_path)
    names = sorted(p.name for p in fresh_dir.glob("*_pb2*.py*"))
    assert names == sorted(p.name for p in STUB_DIR.glob("*_pb2*.py*"))
    for name in names:
        if name.endswith("_pb2.py"):
            continue  # checked through its embedded descriptor, which is version independent
        fresh, committed = (d / name for d in (fresh_dir, STUB_DIR))
        assert _without_version_lines(committed.read_text()) == _without_version_lines(fresh.read_text()), (
            f"sluice/v1/{name} is stale: run `python -m service.gen_protos`"
        )


def test_every_element_of_the_contract_is_commented(tmp_path: Path) -> None:
    (file,) = _descriptor_set(tmp_path, source_info=True).file
    comments = {tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location}
    missing = []
    # Path numbers are FileDescriptorProto / DescriptorProto field numbers.
    for i, message in enumerate(file.message_type):
        if not comments.get((4, i)):
            missing.append(message.name)
        for j, f in enumerate(message.field):
            if f.name not in ("generate", "cancel") and not comments.get((4, i, 2, j)):
                missing.append(f"{message.name}.{f.name}")
    for i, enum in enumerate(file.enum_type):
        missing += [f"{enum.name}.{v.name}" for j, v in enumerate(enum.value)
                    if not comments.get((5, i, 2, j))]
    for i, service in enumerate(file.service):
        missing += [f"{service.name}.{m.name}" for j, m in enumerate(service.method)
                    if not comments.get((6, i, 2, j))]
    assert not missing, f"uncommented: {missing}"


def test_every_sampling_param_has_a_request_field() -> None:
    fields = pb.GenerateRequest.DESCRIPTOR.fields_by_name
    for f in dataclasses.fields(SamplingParams):
        assert f.name in fields, f"GenerateRequest lacks SamplingParams.{f.name}"
        if not fields[f.name].is_repeated:
            assert fields[f.name].has_presence, f"{f.name} must be optional so unset differs from zero"


def test_every_request_field_is_a_sampling_param_or_a_request_option() -> None:
    sampling = {f.name for f in dataclasses.fields(SamplingParams)}
    fields = set(pb.GenerateRequest.DESCRIPTOR.fields_by_name)
    assert not sampling & REQUEST_OPTIONS
    assert fields == sampling | REQUEST_OPTIONS, "map the new GenerateRequest field in service/validation.py"
    assert pb.GenerateRequest.DESCRIPTOR.fields_by_name["cache_salt"].has_presence


@pytest.mark.parametrize("method", ["Generate", "GenerateStream", "Abort", "Tokenize", "Detokenize",
                                    "GetModelInfo", "GetLoad", "ResetPrefixCache"])
def test_stub_and_servicer_expose_every_method(method: str) -> None:
    assert method in pb.DESCRIPTOR.services_by_name["Generation"].methods_by_name
    assert hasattr(pb_grpc.GenerationServicer, method)
    assert hasattr(pb_grpc.GenerationStub(_NullChannel()), method)


class _NullChannel:
    """Enough of a channel for the stub's constructor, which only asks for callables."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
