"""Tests of chemfit.utils (core/utils.py) and chemfit.debug_utils (core/debug_utils.py)."""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import pytest

from chemfit.core.context import ExecutorLike
from chemfit.core.debug_utils import log_all_methods, log_invocation
from chemfit.core.utils import (
    ExtendedJSONEncoder,
    atomic_write_text,
    check_params_near_bounds,
    check_protocol,
    dump_dict_to_file,
    next_free_folder,
)

# -- check_protocol ---------------------------------------------------------------------------


def test_check_protocol_accepts_none_and_implementations():
    check_protocol(None, ExecutorLike)
    with ThreadPoolExecutor(1) as pool:
        check_protocol(pool, ExecutorLike)


def test_check_protocol_raises_type_error_naming_protocol():
    with pytest.raises(TypeError, match="ExecutorLike"):
        check_protocol(object(), ExecutorLike)


def test_check_protocol_non_runtime_checkable_protocol_is_type_error():
    class NotChecked(Protocol):
        def f(self) -> None: ...

    with pytest.raises(TypeError, match="runtime_checkable"):
        check_protocol(object(), NotChecked)


# -- next_free_folder -------------------------------------------------------------------------


def test_next_free_folder(tmp_path):
    base = tmp_path / "run"
    assert next_free_folder(base) == base
    base.mkdir()
    assert next_free_folder(str(base)) == tmp_path / "run_0"
    (tmp_path / "run_0").mkdir()
    (tmp_path / "run_1").write_text("a file also blocks the name")
    assert next_free_folder(base) == tmp_path / "run_2"
    assert not (tmp_path / "run_2").exists()


# -- JSON -------------------------------------------------------------------------------------


def test_extended_json_encoder_paths_and_numpy():
    data = {
        "p": Path("x") / "y.json",
        "arr": np.arange(4).reshape(2, 2),
        "i": np.int64(3),
        "f": np.float32(0.25),
        "b": np.bool_(True),
    }
    out = json.loads(json.dumps(data, cls=ExtendedJSONEncoder))
    assert out == {
        "p": str(Path("x") / "y.json"),
        "arr": [[0, 1], [2, 3]],
        "i": 3,
        "f": 0.25,
        "b": True,
    }


def test_extended_json_encoder_still_rejects_unknown_objects():
    with pytest.raises(TypeError):
        json.dumps({"o": object()}, cls=ExtendedJSONEncoder)


def test_dump_dict_to_file_creates_parents_and_round_trips(tmp_path):
    target = tmp_path / "a" / "b" / "c.json"
    dump_dict_to_file(target, {"x": np.array([1.0, 2.0]), "path": tmp_path})
    assert json.loads(target.read_text()) == {"x": [1.0, 2.0], "path": str(tmp_path)}
    # indented like upstream
    assert target.read_text().startswith('{\n    "x"')


def test_dump_dict_to_file_accepts_str_path(tmp_path):
    dump_dict_to_file(str(tmp_path / "d.json"), {"a": 1})
    assert json.loads((tmp_path / "d.json").read_text()) == {"a": 1}


def test_dump_dict_to_file_failure_keeps_old_content_and_leaves_no_temp(tmp_path):
    target = tmp_path / "d.json"
    dump_dict_to_file(target, {"a": 1})
    with pytest.raises(TypeError):
        dump_dict_to_file(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["d.json"]


def test_atomic_write_replaces_target_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    inode_before = os.stat(target).st_ino
    atomic_write_text(target, "new content")
    assert target.read_text() == "new content"
    # os.replace swaps in a new file rather than rewriting the old one in place
    assert os.stat(target).st_ino != inode_before
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_write_respects_umask_like_a_normal_file(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = atomic_write_text(tmp_path / "atomic.txt", "x")
    assert (os.stat(atomic).st_mode & 0o777) == (os.stat(plain).st_mode & 0o777)


def test_atomic_write_failure_removes_temp_file(tmp_path):
    # os.replace cannot put a file over a non-empty directory: the write fails after the
    # temporary file was written, and the temporary file must be cleaned up.
    target = tmp_path / "d"
    target.mkdir()
    (target / "inside").write_text("x")
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert [p.name for p in target.iterdir()] == ["inside"]


def test_atomic_write_unencodable_text_leaves_target_untouched(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(target, "\udcff", encoding="utf-8")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_write_concurrent_writers_never_leave_partial_file(tmp_path):
    target = tmp_path / "f.json"
    payloads = [json.dumps({"writer": i, "data": list(range(2000))}) for i in range(8)]

    def write(i):
        for _ in range(5):
            atomic_write_text(target, payloads[i])

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_text() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


# -- check_params_near_bounds -----------------------------------------------------------------


def test_near_bounds_parameter_order_and_nested_keys():
    params = {"z": 0.99, "lj": {"eps": 0.001, "sigma": 0.5}, "a": 5.0}
    bounds = {"a": (0.0, 10.0), "lj": {"sigma": (0.0, 1.0), "eps": (0.0, 1.0)}, "z": (0.0, 1.0)}
    assert check_params_near_bounds(params, bounds, 0.02) == [
        ("z", 0.99, 0.0, 1.0),
        ("lj.eps", 0.001, 0.0, 1.0),
    ]


def test_near_bounds_only_with_both_bounds():
    params = {"a": 0.0, "b": 0.0, "c": 0.0}
    bounds = {"a": (None, 0.0), "b": (0.0, None), "c": (None, None)}
    assert check_params_near_bounds(params, bounds, 0.1) == []


def test_near_bounds_zero_and_negative_tolerance():
    bounds = {"a": (0.0, 1.0)}
    assert check_params_near_bounds({"a": 0.0}, bounds, 0.0) == []
    assert check_params_near_bounds({"a": -0.01}, bounds, 0.0) == [("a", -0.01, 0.0, 1.0)]
    # negative tolerance: only values clearly outside are reported
    assert check_params_near_bounds({"a": -0.05}, bounds, -0.1) == []
    assert check_params_near_bounds({"a": 1.2}, bounds, -0.1) == [("a", 1.2, 0.0, 1.0)]


def test_near_bounds_returns_floats_for_numpy_values():
    out = check_params_near_bounds({"a": np.float32(1.0)}, {"a": (np.int64(0), np.int64(1))}, 0.1)
    assert out == [("a", 1.0, 0.0, 1.0)]
    assert all(type(v) is float for v in out[0][1:])


def test_near_bounds_validation():
    with pytest.raises(TypeError, match="relative_tol"):
        check_params_near_bounds({"a": 1.0}, {"a": (0, 2)}, "0.1")
    with pytest.raises(ValueError, match="relative_tol"):
        check_params_near_bounds({"a": 1.0}, {"a": (0, 2)}, float("nan"))
    with pytest.raises(ValueError, match=r"bounds\['a'\]"):
        check_params_near_bounds({"a": 1.0}, {"a": (0, 1, 2)}, 0.1)


# -- debug_utils ------------------------------------------------------------------------------


def test_log_invocation_messages_and_result():
    messages = []

    def add(a, b=0):
        return a + b

    wrapped = log_invocation(add, messages.append)
    assert wrapped(1, b=2) == 3
    assert wrapped.__name__ == "add"
    assert messages[0].startswith("Pre ") and "add" in messages[0] and "b=2" in messages[0]
    assert messages[1].startswith("Post ") and messages[1].endswith("-> 3")


def test_log_invocation_can_hide_args_and_result():
    messages = []
    wrapped = log_invocation(lambda x: x * 2, messages.append, log_args=False, log_res=False)
    assert wrapped(21) == 42
    assert "21" not in messages[0] and "42" not in messages[1]


def test_log_invocation_logs_and_reraises_exceptions():
    messages = []

    def boom():
        raise KeyError("k")

    with pytest.raises(KeyError):
        log_invocation(boom, messages.append)()
    assert messages[0].startswith("Pre") and messages[-1].startswith("Raised")
    assert "KeyError" in messages[-1]


class _Thing:
    label = "cls"

    def __init__(self):
        self.value = 1

    def inc(self, k=1):
        self.value += k
        return self.value

    def __call__(self, x):
        return x + self.value


def test_log_all_methods_proxy_logs_calls_and_passes_attributes_through():
    thing = _Thing()
    messages = []
    proxy = log_all_methods(thing, messages.append)
    assert proxy.inc(2) == 3
    assert thing.value == 3
    assert any("inc" in m and m.startswith("Pre") for m in messages)
    # get/set/del pass through to the wrapped object without logging
    n = len(messages)
    assert proxy.value == 3 and proxy.label == "cls"
    proxy.value = 10
    assert thing.value == 10
    proxy.extra = "x"
    assert thing.extra == "x"
    del proxy.extra
    assert not hasattr(thing, "extra")
    assert len(messages) == n
    # calling the proxy calls (and logs) the object
    assert proxy(5) == 15
    assert len(messages) == n + 2


def test_log_all_methods_forwards_options():
    messages = []
    proxy = log_all_methods(_Thing(), messages.append, False, log_res=False)
    proxy.inc(7)
    assert "7" not in messages[0] and "8" not in messages[1]
    with pytest.raises(TypeError, match="log_args"):
        log_all_methods(_Thing(), messages.append, unknown=True)


def test_log_all_methods_missing_attribute_raises_attribute_error():
    proxy = log_all_methods(_Thing(), lambda m: None)
    with pytest.raises(AttributeError):
        proxy.does_not_exist  # noqa: B018


def test_shims_export_contract_names():
    import chemfit.debug_utils as du
    import chemfit.utils as u

    for name in (
        "check_protocol",
        "next_free_folder",
        "ExtendedJSONEncoder",
        "dump_dict_to_file",
        "check_params_near_bounds",
    ):
        assert getattr(u, name) is not None
    assert du.log_invocation is log_invocation and du.log_all_methods is log_all_methods
