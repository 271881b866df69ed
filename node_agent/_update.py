"""Planning the update of a module the process has already loaded.

The old and new sources are compared statement by statement (AST, positions
ignored) and every change is classified:

* ``body``: a ``def`` (top level or method) whose decorators and closure shape
  did not change.  Precomputed as :class:`SetCode` edits on the live function
  objects, so identity, registries, wrappers and ``from m import f`` keep
  working; memoizing wrappers are cleared.
* ``statement``: a new or reshaped definition, a changed module statement, a
  class whose layout changed.  Compiled in prepare, never executed in the
  live process before the decision: it runs in the staging process
  (:mod:`node_agent._rehearsal`) and then once for real in finish, in the
  module's own namespace, behind the barrier.  A redefined class is merged
  back into the old class object (:mod:`node_agent._classmerge`), so its
  identity survives.
* ``removed``: names the new source no longer binds are unbound.
* refusals (``incompatible_change``): a changed base class, metaclass or
  ``__slots__`` (from the trees); changed enum members (found by the switch,
  so in the staging process).

Default values of a patched function are kept when their expressions did not
change, computed from the tree when they are literals, and otherwise
evaluated by the switch (:class:`~node_agent._patch.SetDefaults`): never in
prepare.

Unchanged statements are never re-run, so module state survives.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

from hotfleet.errors import Reason
from node_agent import _functions as fx
from node_agent._patch import (
    MISSING,
    ClearCache,
    Op,
    SetClassAttr,
    SetCode,
    SetDefaults,
    SetItem,
)
from node_agent._planfacts import Facts, StatementFacts, class_key
from node_agent._prologue import Parts


class Refused(Exception):
    """Internal: an update that cannot be planned; becomes a :class:`ModuleError`."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class Statement:
    """A statement executed for real during finish, in the module's namespace."""

    code: types.CodeType
    lineno: int
    merge_class: type | None = None  # the live class a redefinition is merged into
    name: str = ""
    binds: frozenset[str] | None = None  # names it may bind; None: compare the whole namespace
    # ``NAME = <literal>``: (NAME, value) read off the tree in prepare (ast.literal_eval
    # runs nothing); the switch binds it without executing a statement
    literal: tuple[str, Any] | None = None


@dataclass
class ModulePlan:
    """Everything finish needs to switch one loaded module."""

    module: types.ModuleType
    ops: list[Op] = field(default_factory=list)
    statements: list[Statement] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)  # "kind name" lines, for the report
    warnings: list[str] = field(default_factory=list)
    late_ops: list[Op] = field(default_factory=list)  # after the statements: default values
    replaced_codes: fx.Codes = field(default_factory=fx.Codes)  # may still run in a frame
    new_codes: dict[str, types.CodeType | None] = field(default_factory=dict)
    # id(old) -> (old, new) code of functions made at run time by the functions patched
    nested: dict[int, tuple[types.CodeType, types.CodeType | None]] = field(default_factory=dict)
    # names other modules bound with ``from m import x``: the switch tells only their
    # changes to the rebinding of those bindings (set with the bindings, in prepare)
    watched: frozenset[str] = frozenset()

    def patch_closures(self, live: dict[int, list[types.FunctionType]]) -> None:
        """Closures created at run time by patched functions get the new body too.

        ``live``: the live function objects by ``id`` of their code (see
        :func:`~node_agent._functions.scan_heap`).
        """
        for key, (old, new) in self.nested.items():
            for f in live.get(key, []):
                if new is not None and new.co_freevars == old.co_freevars:
                    self.ops.append(SetCode(f, new, f.__defaults__, f.__kwdefaults__))
                else:
                    self.warnings.append(
                        f"{old.co_qualname}: a live closure keeps its old code "
                        f"({'removed' if new is None else 'closure shape changed'}); "
                        "new calls of the enclosing function create new-code closures"
                    )


class ModulePlanner:
    """Builds the :class:`ModulePlan` of one loaded module.

    Everything it needs to know about the two sources comes from ``facts``
    (:class:`~node_agent._planfacts.Facts`: answered from the trees, or
    replayed from a sibling's record); everything about the live process it
    looks up here, on this process's objects.
    """

    def __init__(self, module: types.ModuleType, facts: Facts, new_code: types.CodeType) -> None:
        self.module = module
        self.g: dict[str, Any] = module.__dict__
        self.facts = facts
        self.plan = ModulePlan(module, new_codes=fx.code_index(new_code))
        self.index = fx.module_functions(self.g, module.__name__)

    # ---------------------------------------------------------------- public
    def build(self) -> ModulePlan:
        try:
            return self._build()
        finally:
            self.facts.done()

    def _build(self) -> ModulePlan:
        facts = self.facts
        for index, kind, name, unchanged in facts.top():
            if kind in ("def", "class"):
                old_kind = facts.old_kind(name)
                if old_kind and facts.same_text(index):
                    continue
                self._plan_definition(index, kind, name, old_kind)
            elif kind == "stmt" and not unchanged:
                self._statement(facts.statement(index), "statement")
        doc = facts.docstring()
        if doc is not None:
            self._statement(doc, "docstring")
        self.plan.removed = sorted(n for n in facts.unbound() if n in self.g)
        self.plan.changes.extend(f"removed {n}" for n in self.plan.removed)
        return self.plan

    # ------------------------------------------------------------- internals
    def _statement(self, stmt: StatementFacts, kind: str, merge_class: type | None = None) -> None:
        """Schedule a compiled statement for the switch (it never runs here)."""
        code, lineno, name, binds, literal = stmt
        self.plan.statements.append(Statement(code, lineno, merge_class, name, binds, literal))
        self.plan.changes.append(f"{kind} {name or f'line {lineno}'}")

    def _plan_definition(self, index: int, kind: str, name: str, old_kind: str) -> None:
        facts = self.facts
        live = self.g.get(name, MISSING)
        if (
            kind == "class"
            and old_kind == "class"
            and isinstance(live, type)
            and live.__module__ == self.module.__name__
        ):
            self._plan_class(index, live)
        elif old_kind and facts.body_only(index) and self.index.get(name):
            self._swap_code((index,), name, self.index[name], live)
            self.plan.changes.append(f"body {name}")
        elif not old_kind and name not in self.g:  # a new name: its function made here if it can be
            if not self._new_function(index, name):
                self._statement(facts.statement(index), "new")
        elif not old_kind or not facts.same_tree(index):  # not a mere reformatting
            self._statement(facts.statement(index), "redefined" if old_kind else "new")

    def _new_function(self, index: int, name: str) -> bool:
        """A new top-level function made in prepare (its ``def`` runs no code), bound by the switch."""
        defaults = self.facts.plain_def(index)
        code = self.plan.new_codes.get(name)
        fn = None if defaults is None or code is None else _function(code, self.g, *defaults)
        if fn is None:
            return False
        self.plan.ops.append(SetItem(self.g, name, fn))
        self.plan.changes.append(f"new {name}")
        return True

    def _swap_code(
        self, path: tuple[int, ...], qualname: str, funcs: list[types.FunctionType], holder: Any
    ) -> None:
        new = self.plan.new_codes.get(qualname)
        if new is None:
            raise Refused(
                Reason.INCOMPATIBLE_CHANGE,
                f"{qualname}: defined more than once; cannot tell which to patch",
            )
        # Default values: kept if their expressions did not change, taken from the
        # tree if literal, otherwise evaluated by the switch (no code runs here).
        how = self.facts.defaults(*path)
        doc = how[1]
        literal = (how[2], how[3]) if how[0] == "literal" else None
        late: types.CodeType | None = how[2] if how[0] == "late" else None
        for f in funcs:
            if f.__code__.co_freevars != new.co_freevars:
                raise Refused(
                    Reason.INCOMPATIBLE_CHANGE,
                    f"{qualname}: closure shape changed {f.__code__.co_freevars} -> {new.co_freevars}",
                )
            self._remember_nested(f.__code__)
            self.plan.replaced_codes.add(f.__code__)
            defaults, kwdefaults = literal or (f.__defaults__, f.__kwdefaults__)
            self.plan.ops.append(SetCode(f, new, defaults, kwdefaults, doc))
            if late is not None:
                self.plan.late_ops.append(SetDefaults(f, late))
        if holder is not MISSING:
            self.plan.ops.extend(ClearCache(c) for c in fx.caches_of(holder))

    def _remember_nested(self, code: types.CodeType) -> None:
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                # Generator expressions are left out: they are consumed where they
                # are made (a stored, half-run one keeps its old code unreported),
                # and looking for them would cost a heap walk in nearly every prepare.
                if fx.callable_again(const):
                    self.plan.replaced_codes.add(const)
                    self.plan.nested[id(const)] = (
                        const,
                        self.plan.new_codes.get(const.co_qualname),
                    )
                self._remember_nested(const)

    def _plan_class(self, index: int, cls: type) -> None:
        qual = cls.__qualname__
        header, slots, decorators, bodies = self.facts.class_shape(index)
        if not header:
            raise Refused(
                Reason.INCOMPATIBLE_CHANGE, f"class {qual}: base classes or metaclass changed"
            )
        if not slots:
            raise Refused(
                Reason.INCOMPATIBLE_CHANGE,
                f"class {qual}: __slots__ changed (instance layout cannot change in place)",
            )
        if decorators and bodies and self._bodies_only(index, cls):
            return
        if self.facts.same_tree(index):  # reformatted, nothing to merge
            return
        if type(cls) is type and self._members_only(index, cls):
            return
        self._statement(self.facts.statement(index), "class", merge_class=cls)
        hooked = [b for b in cls.__mro__[1:] if "__init_subclass__" in vars(b) and b is not object]
        if hooked:  # its side effects are the app's own: said, not undone
            self.plan.warnings.append(
                f"{self.module.__name__}.{qual}: its class statement runs again at finish to merge "
                f"the change, and with it {hooked[0].__qualname__}.__init_subclass__, on a fresh "
                "copy of the class (a registry it adds classes to keeps that copy beside the "
                "live one)"
            )

    def _bodies_only(self, index: int, cls: type) -> bool:
        """Patch methods in place when nothing but method bodies changed.

        Asked only when the class's statements are the same apart from
        method bodies (:meth:`Facts.class_shape`).
        """
        swaps: list[_Swap] = []
        if not all(self._kept(index, j, name, cls, swaps) for j, name in self.facts.methods(index)):
            return False
        self._swap_methods(cls, swaps)
        return True

    def _members_only(self, index: int, cls: type) -> bool:
        """Edit the live class member by member when its statement need not run.

        For a class of the plain metaclass whose change
        :meth:`Facts.class_edit` can state: methods added (their functions
        made here from the new code, ``super()`` pointed at the live class),
        literal attributes set, members removed, bodies swapped.  The class
        statement then never runs (not here, not in the switch), and the
        switch is a few attribute stores instead of a class creation and a
        merge.
        """
        edit = self.facts.class_edit(index)
        if edit is None:
            return False
        qual = cls.__qualname__
        swaps: list[_Swap] = []
        ops: list[Op] = []
        changes: list[str] = []
        for kind, name, *rest in edit:
            if kind == "keep":
                if not self._kept(index, rest[0], name, cls, swaps):
                    return False
            elif isinstance(cls.__dict__.get(name), types.MemberDescriptorType):
                return False  # a slot's descriptor: a class statement refuses to shadow it
            elif kind == "new":
                code = self.plan.new_codes.get(f"{qual}.{rest[3]}")
                fn = None if code is None else _function(code, self.g, rest[1], rest[2], cls)
                if fn is None:
                    return False
                ops.append(SetClassAttr(cls, name, fn))
                changes.append(f"method {qual}.{rest[3]}")
            elif kind == "set":
                ops.append(SetClassAttr(cls, name, rest[0]))
                changes.append(f"attribute {qual}.{name}")
            elif name in cls.__dict__:  # "del"
                ops.append(SetClassAttr(cls, name, MISSING))
                changes.append(f"removed {qual}.{name}")
        self.plan.ops.extend(ops)
        self.plan.changes.extend(changes)
        self._swap_methods(cls, swaps)
        return True

    def _kept(self, index: int, j: int, name: str, cls: type, swaps: list[_Swap]) -> bool:
        """A method both versions define: unchanged, or its code swapped (added to
        ``swaps``); ``False`` when neither will do."""
        facts = self.facts
        if facts.same_text(index, j):
            return True
        qualname = f"{cls.__qualname__}.{name}"
        funcs = [f for f in fx.class_functions(cls, self.g) if f.__code__.co_qualname == qualname]
        new = self.plan.new_codes.get(qualname)
        if (
            facts.body_only(index, j)
            and funcs
            and new is not None
            and all(f.__code__.co_freevars == new.co_freevars for f in funcs)
        ):
            swaps.append(((index, j), qualname, funcs, name))  # a reformatting swaps harmlessly
            return True
        return facts.same_tree(index, j)

    def _swap_methods(self, cls: type, swaps: list[_Swap]) -> None:
        for path, qualname, funcs, name in swaps:
            holder = cls.__dict__.get(class_key(cls.__name__, name), MISSING)
            self._swap_code(path, qualname, funcs, holder)
            self.plan.changes.append(f"body {qualname}")


def changed_parts(plan: ModulePlan) -> Parts:
    """What of the module the plan changes, for the counting twins (:class:`Parts`).

    Code swapped in (a closure counts as the definition it is made in),
    functions bound by edits, definitions and other statements that run in
    the switch: the functions :func:`node_agent.coverage.changed_functions`
    can find in the journal all live in one of them.
    """
    paths: set[tuple[str, ...]] = set()
    lines: set[int] = set()

    def add(code: types.CodeType) -> None:
        paths.add(tuple(code.co_qualname.split(".<locals>.")[0].split(".")))

    for op in plan.ops:
        if isinstance(op, SetCode):
            add(op.code)
        elif isinstance(op, SetItem | SetClassAttr) and isinstance(op.value, types.FunctionType):
            add(op.value.__code__)
    for st in plan.statements:
        if st.literal is not None:
            continue
        if st.name:
            paths.add((st.name,))
        else:
            lines.add(st.lineno)
    return Parts(frozenset(paths), frozenset(lines))


# a method whose code is swapped: its path, qualified name, live functions, member name
_Swap = tuple[tuple[int, ...], str, list[types.FunctionType], str]


def _function(
    code: types.CodeType,
    g: dict[str, Any],
    defaults: tuple[Any, ...] | None,
    kwdefaults: dict[str, Any] | None,
    cls: type | None = None,
) -> types.FunctionType | None:
    """What a plain ``def`` would make of ``code`` in ``g`` (in class ``cls``); runs no code.

    A method's only possible free variable is the implicit ``__class__``
    cell (``super()``): it holds the live class, as merging would have made
    it.  ``None`` for any other closure.
    """
    if code.co_freevars not in ((), ("__class__",)) or (code.co_freevars and cls is None):
        return None
    closure = (types.CellType(cls),) if code.co_freevars else None
    fn = types.FunctionType(code, g, code.co_name, defaults, closure)
    if kwdefaults:
        fn.__kwdefaults__ = dict(kwdefaults)
    return fn
