"""The committed stubs match proto/, and the wire contract holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hotfleet._proto.hotfleet.v1 import agent_pb2, agent_pb2_grpc, common_pb2

ROOT = Path(__file__).resolve().parent.parent
MUTATING = {"Prepare", "Unpack", "Finish", "Abort", "Rollback", "MakePermanent"}


def test_generated_stubs_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prepare_request_round_trip() -> None:
    request = agent_pb2.PrepareRequest(
        rollout_id="r-1",
        epoch=2**40,
        release=common_pb2.ReleaseManifest(
            name="shop",
            version="1.2.0",
            modules=[
                common_pb2.ModuleEntry(
                    name="shop.pricing", path="shop/pricing.py", digest="ab" * 32, depends=["shop"]
                )
            ],
        ),
    )
    decoded = agent_pb2.PrepareRequest.FromString(request.SerializeToString())
    assert decoded == request
    assert decoded.release.modules[0].depends == ["shop"]


def test_mutating_requests_are_fenced() -> None:
    service = agent_pb2.DESCRIPTOR.services_by_name["NodeAgent"]
    assert {m.name for m in service.methods} == MUTATING | {"Status", "ModuleStatus", "Health"}
    uint64 = agent_pb2.PrepareRequest.DESCRIPTOR.fields_by_name["epoch"].type
    for method in service.methods:
        if method.name in MUTATING:
            fields = method.input_type.fields_by_name
            assert fields["epoch"].type == uint64, method.name
            assert "rollout_id" in fields, method.name
    assert hasattr(agent_pb2_grpc, "NodeAgentStub")
    assert hasattr(agent_pb2_grpc, "add_NodeAgentServicer_to_server")
