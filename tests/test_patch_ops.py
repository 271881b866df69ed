"""The switch's staged code swaps do exactly what applying each op does, and undo restores it.

:func:`~node_agent._patch.stage_inverses` decides before the hold which
functions need more than their code set (defaults, keyword defaults,
docstring), so that the hold sets as little as it can.  These tests hold it to
the plain semantics: for any sequence of swaps (a function named twice, a
docstring equal but not identical, a function swapped behind the stager's
back) the staged application leaves every function exactly as applying the
ops one by one does, and undoing the journal gives back the very objects the
functions had.
"""

from __future__ import annotations

import types
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from node_agent._patch import MISSING, Op, SetCode, apply_staged, stage_inverses, undo

N_FUNCS = 4


def _functions() -> list[types.FunctionType]:
    g: dict[str, Any] = {}
    src = "".join(
        f"def f{i}(a, b={i}, *, c='{i}'):\n    '''doc {i}'''\n    return a + b + {i}\n"
        for i in range(N_FUNCS)
    )
    exec(compile(src, "<patch-ops>", "exec"), g)
    return [g[f"f{i}"] for i in range(N_FUNCS)]


def _state(f: types.FunctionType) -> tuple[Any, ...]:
    return (f.__code__, f.__defaults__, f.__kwdefaults__, f.__doc__)


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Code, defaults and keyword defaults by identity; the docstring by value."""
    return a[0] is b[0] and a[1] is b[1] and a[2] is b[2] and a[3] == b[3]


def _new_code(f: types.FunctionType, n: int) -> types.CodeType:
    return f.__code__.replace(co_consts=(*f.__code__.co_consts, f"v{n}"))


# one op: which function, and whether it changes its defaults, kwdefaults, docstring
_op = st.tuples(
    st.integers(0, N_FUNCS - 1),
    st.booleans(),
    st.booleans(),
    st.sampled_from(["same-object", "equal-copy", "changed", "missing"]),
)


def _build(funcs: list[types.FunctionType], spec: list[tuple[int, bool, bool, str]]) -> list[Op]:
    ops: list[Op] = []
    for n, (i, defaults, kwdefaults, doc) in enumerate(spec):
        f = funcs[i]
        new_doc: Any = {
            "same-object": f.__doc__,
            "equal-copy": "".join(list(f.__doc__ or "")),  # equal, not identical
            "changed": f"doc v{n}",
            "missing": MISSING,
        }[doc]
        ops.append(
            SetCode(
                f,
                _new_code(f, n),
                (n, n) if defaults else f.__defaults__,
                {"c": str(n)} if kwdefaults else f.__kwdefaults__,
                new_doc,
            )
        )
    return ops


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_op, min_size=1, max_size=8),
    st.one_of(st.none(), st.integers(0, N_FUNCS - 1)),
)
def test_staged_swaps_equal_plain_application_and_undo_restores_the_same_objects(
    spec: list[tuple[int, bool, bool, str]], behind: int | None
) -> None:
    """``behind``: a function whose code something swaps after the staging (the
    one-pass application must not be taken then)."""
    plain_funcs, staged_funcs = _functions(), _functions()
    plain_ops = _build(plain_funcs, spec)
    staged_ops = _build(staged_funcs, spec)
    staged = stage_inverses(staged_ops)
    if behind is not None:
        for funcs in (plain_funcs, staged_funcs):
            funcs[behind].__code__ = _new_code(funcs[behind], 99)
    plain_before = [_state(f) for f in plain_funcs]
    staged_before = [_state(f) for f in staged_funcs]

    plain_journal = [op.apply() for op in plain_ops]
    staged_journal: list[Op] = []
    apply_staged(staged_ops, staged, staged_journal)

    for p, s in zip(plain_funcs, staged_funcs, strict=True):
        # same consts -> equal code; the docstrings and defaults by value
        assert p.__code__ == s.__code__
        assert (p.__defaults__, p.__kwdefaults__, p.__doc__) == (
            s.__defaults__,
            s.__kwdefaults__,
            s.__doc__,
        )
    undo(plain_journal)
    undo(staged_journal)
    assert all(_same(_state(f), b) for f, b in zip(plain_funcs, plain_before, strict=True))
    assert all(_same(_state(f), b) for f, b in zip(staged_funcs, staged_before, strict=True))


def test_a_body_edit_sets_only_the_code_and_keeps_the_default_objects() -> None:
    (f, *_) = _functions()
    defaults, kwdefaults = f.__defaults__, f.__kwdefaults__
    ops: list[Op] = [SetCode(f, _new_code(f, 1), defaults, kwdefaults, "".join(["doc 0"]))]
    staged = stage_inverses(ops)
    assert staged[0] is not None and staged[0][1] is False  # nothing but the code to set
    journal: list[Op] = []
    apply_staged(ops, staged, journal)
    assert f.__code__ is ops[0].code  # type: ignore[attr-defined]
    assert f.__defaults__ is defaults and f.__kwdefaults__ is kwdefaults


def test_a_function_swapped_after_staging_is_applied_afresh_and_undone_to_its_swapped_code() -> (
    None
):
    (f, *_) = _functions()
    ops: list[Op] = [SetCode(f, _new_code(f, 1), f.__defaults__, f.__kwdefaults__)]
    staged = stage_inverses(ops)
    behind_our_back = _new_code(f, 2)
    f.__code__ = behind_our_back
    journal: list[Op] = []
    apply_staged(ops, staged, journal)
    assert f.__code__ is ops[0].code  # type: ignore[attr-defined]
    undo(journal)
    assert f.__code__ is behind_our_back
