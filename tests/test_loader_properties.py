"""Property tests: whatever the release, upgrade then rollback gives back the original."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.codebase import Codebase

TEMPLATE = """
import node_agent

CONST = {c}

def f(x={c}):
    return ("f", x)

class K:
    label = "{c}"

    def m(self):
        return ("m", {c}, self.n)

    def code_change(self, old_vsn, state, extra):
        return {{"n": state["n"] + (1 if old_vsn != ("down", None) else -1)}}

def make():
    obj = K()
    obj.n = 0
    return node_agent.register(obj)

OBJ = make()
{extra}
"""

module_spec = st.tuples(
    st.integers(0, 50),  # v1 constant
    st.integers(51, 99),  # v2 constant
    st.booleans(),  # v2 adds a function
    st.booleans(),  # v2 changes the class layout (new attribute)
)


def _source(c: int, extra: str = "") -> str:
    return TEMPLATE.format(c=c, extra=extra)


def _behaviour(cb: Codebase, names: list[str]) -> list[object]:
    out: list[object] = []
    for n in names:
        m = cb.module(n)
        out.append(
            (
                m.CONST,
                m.f(),
                m.K().__class__.label,
                m.OBJ.m(),
                dict(vars(m.OBJ)),
                sorted(k for k in vars(m) if not k.startswith("__")),
            )
        )
    return out


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(specs=st.lists(module_spec, min_size=1, max_size=4))
def test_upgrade_then_rollback_restores_behaviour_and_state(
    tmp_path_factory: pytest.TempPathFactory, specs: list[tuple[int, int, bool, bool]]
) -> None:
    cb = Codebase(tmp_path_factory.mktemp("prop") / "code")
    try:
        names = [f"m{i}" for i in range(len(specs))]
        cb.boot({n: _source(a) for n, (a, _b, _f, _k) in zip(names, specs, strict=True)})
        before = _behaviour(cb, names)
        v2 = {}
        for n, (_a, b, new_fn, new_attr) in zip(names, specs, strict=True):
            extra = "\ndef added():\n    return 1\n" if new_fn else ""
            src = _source(b, extra)
            if new_attr:
                src = src.replace('    label = "', '    extra_attr = 1\n    label = "')
            v2[n] = src
        prepared = cb.loader.prepare(cb.release("2", v2))
        first = cb.loader.finish(prepared)
        after = _behaviour(cb, names)
        for (_, b, _, _), (const, f, _, m, state, _) in zip(specs, after, strict=True):
            assert const == b and f == ("f", b) and m == ("m", b, 1) and state == {"n": 1}
        assert cb.loader.finish(prepared) is first  # repeating a finish is a no-op
        assert _behaviour(cb, names) == after
        cb.loader.rollback()
        assert _behaviour(cb, names) == before
    finally:
        cb.close()
