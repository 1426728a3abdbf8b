"""The patch ledger, exercised on classes of our own (never on aiohttp)."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Tuple, Type

import pytest

from aiohttp_payloadfix._ledger import MARKER, Ledger, Patch, PayloadFixWarning


# Results are typed Any: the tests replace these methods with wrappers that
# return tuples.
class Base:
    def greet(self) -> Any:
        return "base"

    def other(self) -> Any:
        return "other"

    @classmethod
    def make(cls) -> Any:
        return f"made {cls.__name__}"

    @staticmethod
    def helper() -> Any:
        return 1


class Child(Base):
    def own(self) -> Any:
        return "own"


TOUCHED: Tuple[Type[Any], ...] = (Base, Child)


def _snapshot() -> Dict[Type[Any], Dict[str, Any]]:
    return {cls: dict(vars(cls)) for cls in TOUCHED}


def _diff(before: Dict[Type[Any], Dict[str, Any]]) -> List[str]:
    """Names whose object is not the very one recorded in ``before``."""
    changed = []
    for cls, old in before.items():
        new = vars(cls)
        for name in sorted(set(old) | set(new)):
            if name not in old or name not in new or new[name] is not old[name]:
                changed.append(f"{cls.__name__}.{name}")
    return changed


@pytest.fixture(autouse=True)
def untouched_classes() -> Iterator[None]:
    """Every test leaves Base and Child exactly as it found them."""
    before = _snapshot()
    yield
    assert _diff(before) == []


@pytest.fixture
def ledger() -> Iterator[Ledger]:
    ledger = Ledger()
    yield ledger
    ledger.revert_all()


def wrap_method(original: Callable[..., Any]) -> Callable[..., Any]:
    def replacement(self: Any) -> Tuple[str, Any]:
        return ("patched", original(self))

    return replacement


def wrap_classmethod(original: Any) -> Any:
    func = original.__func__

    def replacement(cls: Any) -> Tuple[str, Any]:
        return ("patched", func(cls))

    return classmethod(replacement)


def wrap_staticmethod(original: Any) -> Any:
    func = original.__func__

    def replacement() -> Tuple[str, Any]:
        return ("patched", func())

    return staticmethod(replacement)


class TestIdentity:
    def test_replacement_is_ours_and_marked(self, ledger: Ledger) -> None:
        original = vars(Base)["greet"]
        assert ledger.apply("fix-a", [Patch(Base, "greet", wrap_method)])
        replacement = vars(Base)["greet"]
        assert replacement is not original
        assert getattr(replacement, MARKER) == "fix-a"
        assert replacement.__wrapped__ is original
        assert Base().greet() == ("patched", "base")

    def test_revert_restores_the_very_original(self, ledger: Ledger) -> None:
        original = vars(Base)["greet"]
        ledger.apply("fix-a", [Patch(Base, "greet", wrap_method)])
        assert ledger.revert("fix-a")
        assert vars(Base)["greet"] is original
        assert not hasattr(original, MARKER)
        assert Base().greet() == "base"

    def test_build_receives_the_stored_object(self, ledger: Ledger) -> None:
        received: List[Any] = []

        def build(original: Any) -> Any:
            received.append(original)
            return wrap_classmethod(original)

        ledger.apply("fix-a", [Patch(Base, "make", build)])
        assert received == [vars(Base)["make"].__func__.__wrapped__]
        assert isinstance(received[0], classmethod)

    def test_inherited_attribute_is_deleted_again(self, ledger: Ledger) -> None:
        before = dict(vars(Child))
        inherited = vars(Base)["greet"]
        ledger.apply("fix-a", [Patch(Child, "greet", wrap_method)])
        assert "greet" in vars(Child)
        assert vars(Child)["greet"].__wrapped__ is inherited
        assert Child().greet() == ("patched", "base")
        assert Base().greet() == "base"

        ledger.revert("fix-a")
        assert "greet" not in vars(Child)
        assert dict(vars(Child)) == before
        assert all(vars(Child)[k] is v for k, v in before.items())
        assert Child.greet is inherited

    @pytest.mark.parametrize(
        ("name", "build", "expected"),
        [
            ("make", wrap_classmethod, ("patched", "made Base")),
            ("helper", wrap_staticmethod, ("patched", 1)),
        ],
    )
    def test_descriptor_restored_as_same_object(
        self,
        ledger: Ledger,
        name: str,
        build: Callable[[Any], Any],
        expected: Tuple[str, Any],
    ) -> None:
        descriptor = vars(Base)[name]
        ledger.apply("fix-a", [Patch(Base, name, build)])
        replacement = vars(Base)[name]
        assert type(replacement) is type(descriptor)
        assert getattr(replacement.__func__, MARKER) == "fix-a"
        assert getattr(Base, name)() == expected

        ledger.revert("fix-a")
        assert vars(Base)[name] is descriptor
        assert getattr(Base, name)() == expected[1]

    def test_inherited_classmethod_deleted_again(self, ledger: Ledger) -> None:
        ledger.apply("fix-a", [Patch(Child, "make", wrap_classmethod)])
        assert Child.make() == ("patched", "made Child")
        assert Base.make() == "made Base"
        ledger.revert("fix-a")
        assert "make" not in vars(Child)
        assert Child.make() == "made Child"


class TestIdempotence:
    def test_apply_twice(self, ledger: Ledger) -> None:
        builds: List[Any] = []

        def build(original: Callable[..., Any]) -> Callable[..., Any]:
            builds.append(original)
            return wrap_method(original)

        patches = [Patch(Base, "greet", build)]
        assert ledger.apply("fix-a", patches) is True
        replacement = vars(Base)["greet"]
        assert ledger.apply("fix-a", patches) is False
        assert vars(Base)["greet"] is replacement
        assert len(builds) == 1
        assert Base().greet() == ("patched", "base")
        assert ledger.applied() == ("fix-a",)

    def test_revert_twice(self, ledger: Ledger) -> None:
        original = vars(Base)["greet"]
        ledger.apply("fix-a", [Patch(Child, "greet", wrap_method)])
        ledger.apply("fix-b", [Patch(Base, "greet", wrap_method)])
        assert ledger.revert("fix-a") is True
        assert ledger.revert("fix-a") is False
        assert ledger.revert("fix-b") is True
        assert ledger.revert("fix-b") is False
        assert ledger.revert("never-applied") is False
        assert vars(Base)["greet"] is original
        assert "greet" not in vars(Child)
        assert ledger.applied() == ()

    def test_reapply_after_revert(self, ledger: Ledger) -> None:
        original = vars(Base)["greet"]
        for _ in range(3):
            assert ledger.apply("fix-a", [Patch(Base, "greet", wrap_method)])
            assert vars(Base)["greet"].__wrapped__ is original
            assert ledger.revert("fix-a")
            assert vars(Base)["greet"] is original

    def test_first_saved_original_wins(self, ledger: Ledger) -> None:
        original = vars(Base)["greet"]
        ledger.apply("fix-a", [Patch(Base, "greet", wrap_method)])
        first = vars(Base)["greet"]
        ledger.apply("fix-b", [Patch(Base, "greet", wrap_method)])
        assert vars(Base)["greet"].__wrapped__ is first
        assert ledger.get_original(Base, "greet") is original
        assert Base().greet() == ("patched", ("patched", "base"))

        assert ledger.revert_all() == ("fix-b", "fix-a")
        assert vars(Base)["greet"] is original
        assert ledger.applied() == ()


class TestRollback:
    def test_build_raises(self, ledger: Ledger) -> None:
        def broken(original: Any) -> Any:
            raise RuntimeError("cannot build")

        with pytest.raises(RuntimeError, match="cannot build"):
            ledger.apply(
                "fix-a",
                [
                    Patch(Base, "greet", wrap_method),
                    Patch(Child, "other", wrap_method),
                    Patch(Base, "make", wrap_classmethod),
                    Patch(Base, "helper", broken),
                ],
            )
        # The autouse fixture checks every attribute is the original again.
        assert not ledger.is_applied("fix-a")
        assert ledger.applied() == ()
        assert not ledger.is_object_patched(Base, "greet")
        assert "other" not in vars(Child)

    def test_setattr_fails(self, ledger: Ledger) -> None:
        # Attributes of built-in types cannot be set: setattr raises TypeError
        # after our replacement for Base.greet is already in place.
        with pytest.raises(TypeError):
            ledger.apply(
                "fix-a",
                [
                    Patch(Base, "greet", wrap_method),
                    Patch(Child, "greet", wrap_method),
                    Patch(int, "bit_length", wrap_method),
                ],
            )
        assert not ledger.is_applied("fix-a")
        assert "greet" not in vars(Child)
        assert "bit_length" in vars(int)

    def test_missing_attribute(self, ledger: Ledger) -> None:
        with pytest.raises(AttributeError, match="no_such_method"):
            ledger.apply(
                "fix-a",
                [
                    Patch(Base, "greet", wrap_method),
                    Patch(Base, "no_such_method", wrap_method),
                ],
            )
        assert not ledger.is_applied("fix-a")

    def test_fix_can_be_applied_after_a_rollback(self, ledger: Ledger) -> None:
        def broken(original: Any) -> Any:
            raise RuntimeError("cannot build")

        with pytest.raises(RuntimeError):
            ledger.apply(
                "fix-a",
                [Patch(Base, "greet", wrap_method), Patch(Base, "other", broken)],
            )
        assert ledger.apply("fix-a", [Patch(Base, "greet", wrap_method)])
        assert Base().greet() == ("patched", "base")

    def test_rollback_leaves_other_fixes_alone(self, ledger: Ledger) -> None:
        def broken(original: Any) -> Any:
            raise RuntimeError("cannot build")

        ledger.apply("fix-a", [Patch(Base, "greet", wrap_method)])
        replacement = vars(Base)["greet"]
        with pytest.raises(RuntimeError):
            ledger.apply(
                "fix-b",
                [Patch(Base, "other", wrap_method), Patch(Base, "make", broken)],
            )
        assert vars(Base)["greet"] is replacement
        assert ledger.applied() == ("fix-a",)


class TestForeignWrapper:
    def test_foreign_wrapper_survives_revert(self, ledger: Ledger) -> None:
        original = vars(Base)["greet"]
        original_other = vars(Base)["other"]
        ledger.apply(
            "fix-a",
            [Patch(Base, "greet", wrap_method), Patch(Base, "other", wrap_method)],
        )
        ours = vars(Base)["greet"]

        def foreign(self: Any) -> Tuple[str, Any]:
            return ("foreign", ours(self))

        Base.greet = foreign  # type: ignore[method-assign]
        try:
            with pytest.warns(PayloadFixWarning, match=r"Base\.greet.*'fix-a'"):
                assert ledger.revert("fix-a")
            assert vars(Base)["greet"] is foreign
            assert Base().greet() == ("foreign", ("patched", "base"))
            # The other attribute of the same fix is still ours: restored.
            assert vars(Base)["other"] is original_other
        finally:
            Base.greet = original  # type: ignore[method-assign]

    def test_foreign_wrapper_on_inherited_attribute(self, ledger: Ledger) -> None:
        ledger.apply("fix-a", [Patch(Child, "greet", wrap_method)])

        def foreign(self: Any) -> str:
            return "foreign"

        Child.greet = foreign  # type: ignore[method-assign]
        try:
            with pytest.warns(PayloadFixWarning, match="another library"):
                ledger.revert("fix-a")
            assert vars(Child)["greet"] is foreign
        finally:
            del Child.greet

    def test_attribute_deleted_by_someone_else(self, ledger: Ledger) -> None:
        ledger.apply("fix-a", [Patch(Child, "greet", wrap_method)])
        del Child.greet
        with pytest.warns(PayloadFixWarning):
            ledger.revert("fix-a")
        assert "greet" not in vars(Child)


class TestQueries:
    def test_is_object_patched(self, ledger: Ledger) -> None:
        assert not ledger.is_object_patched(Child, "greet")
        ledger.apply("fix-a", [Patch(Child, "greet", wrap_method)])
        assert ledger.is_object_patched(Child, "greet")
        assert not ledger.is_object_patched(Base, "greet")
        assert not ledger.is_object_patched(Child, "other")
        ledger.revert("fix-a")
        assert not ledger.is_object_patched(Child, "greet")

    def test_get_original_own_attribute(self, ledger: Ledger) -> None:
        original = vars(Base)["greet"]
        assert ledger.get_original(Base, "greet") is original
        ledger.apply("fix-a", [Patch(Base, "greet", wrap_method)])
        assert ledger.get_original(Base, "greet") is original
        assert ledger.get_original(Base, "other") is vars(Base)["other"]

    def test_get_original_descriptor(self, ledger: Ledger) -> None:
        descriptor = vars(Base)["make"]
        ledger.apply("fix-a", [Patch(Base, "make", wrap_classmethod)])
        assert ledger.get_original(Base, "make") is descriptor

    def test_get_original_inherited_attribute(self, ledger: Ledger) -> None:
        ledger.apply("fix-a", [Patch(Child, "greet", wrap_method)])
        assert ledger.get_original(Child, "greet") is vars(Base)["greet"]

    def test_get_original_inherited_from_patched_parent(self, ledger: Ledger) -> None:
        original = vars(Base)["greet"]
        ledger.apply(
            "fix-a",
            [Patch(Base, "greet", wrap_method), Patch(Child, "greet", wrap_method)],
        )
        assert ledger.get_original(Child, "greet") is original

    def test_get_original_missing(self, ledger: Ledger) -> None:
        with pytest.raises(AttributeError, match="no_such_method"):
            ledger.get_original(Base, "no_such_method")

    def test_applied_in_order(self, ledger: Ledger) -> None:
        ledger.apply("fix-b", [Patch(Base, "other", wrap_method)])
        ledger.apply("fix-a", [Patch(Base, "greet", wrap_method)])
        assert ledger.applied() == ("fix-b", "fix-a")
        assert ledger.is_applied("fix-a") and ledger.is_applied("fix-b")
        assert not ledger.is_applied("fix-c")


def test_two_threads_apply_once(ledger: Ledger) -> None:
    builds: List[Any] = []
    results: List[bool] = []
    errors: List[BaseException] = []
    barrier = threading.Barrier(2)

    def slow_build(original: Callable[..., Any]) -> Callable[..., Any]:
        builds.append(original)
        time.sleep(0.05)  # widen the window a racing apply would hit
        return wrap_method(original)

    def worker() -> None:
        try:
            barrier.wait(timeout=5)
            results.append(ledger.apply("fix-a", [Patch(Base, "greet", slow_build)]))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert sorted(results) == [False, True]
    assert len(builds) == 1
    assert Base().greet() == ("patched", "base")
    assert vars(Base)["greet"].__wrapped__ is builds[0]
