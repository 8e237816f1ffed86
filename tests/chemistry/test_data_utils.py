"""Tests of chemfit.data_utils (chemistry/data_utils.py) on real CSV files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chemfit.chemistry.data_utils import (
    DEFAULT_SLICE,
    MissingColumnError,
    process_csv,
    process_single_csv,
)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_file_column_is_relative_to_the_csv(tmp_path, monkeypatch):
    csv_path = _write(
        tmp_path / "data" / "set.csv",
        "file,tag,reference_energy,comment\n"
        "geo/a.xyz,a,-1.0,ignored\n"
        "b.xyz,b,2.5e-1,also ignored\n",
    )
    monkeypatch.chdir(tmp_path)  # the working directory must not matter for 'file'
    paths, tags, energies = process_single_csv(Path("data/set.csv"))
    folder = csv_path.parent.resolve()
    assert paths == [folder / "geo" / "a.xyz", folder / "b.xyz"]
    assert tags == ["a", "b"]
    assert energies == [-1.0, 0.25]
    assert all(isinstance(e, float) for e in energies)


def test_path_column_is_taken_as_written_and_wins_over_file(tmp_path):
    csv_path = _write(
        tmp_path / "set.csv",
        f"tag,reference_energy,file,path\nx,1,ignored.xyz,{tmp_path / 'abs.xyz'}\ny,2,i2.xyz,rel/y.xyz\n",
    )
    paths, tags, energies = process_single_csv(str(csv_path))
    assert paths == [tmp_path / "abs.xyz", Path("rel/y.xyz")]
    assert tags == ["x", "y"]
    assert energies == [1.0, 2.0]


def test_quoting_whitespace_bom_and_blank_lines(tmp_path):
    csv_path = tmp_path / "set.csv"
    csv_path.write_bytes(
        "\ufefffile, tag, reference_energy\n"
        '"with, comma.xyz", "tag, quoted" , -3\n'
        "\n"
        "plain.xyz,plain,  4.0\n".encode()
    )
    paths, tags, energies = process_single_csv(csv_path)
    assert [p.name for p in paths] == ["with, comma.xyz", "plain.xyz"]
    assert tags == ["tag, quoted", "plain"]
    assert energies == [-3.0, 4.0]


def test_index_slice_and_int(tmp_path):
    rows = "".join(f"f{i}.xyz,t{i},{i}\n" for i in range(6))
    csv_path = _write(tmp_path / "set.csv", "file,tag,reference_energy\n" + rows)
    assert process_single_csv(csv_path, DEFAULT_SLICE)[1] == [f"t{i}" for i in range(6)]
    assert process_single_csv(csv_path, slice(1, 5, 2))[1] == ["t1", "t3"]
    assert process_single_csv(csv_path, -1) == ([tmp_path.resolve() / "f5.xyz"], ["t5"], [5.0])
    with pytest.raises(IndexError, match="6 rows"):
        process_single_csv(csv_path, 10)
    with pytest.raises(TypeError, match="index"):
        process_single_csv(csv_path, [0, 1])


def test_missing_file():
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        process_single_csv("nope.csv")


@pytest.mark.parametrize(
    ("header", "row", "column"),
    [
        ("tag,reference_energy", "a,1", "'path' or 'file'"),
        ("file,reference_energy", "a.xyz,1", "'tag'"),
        ("file,tag", "a.xyz,a", "'reference_energy'"),
    ],
)
def test_missing_columns_name_file_and_column(tmp_path, header, row, column):
    csv_path = _write(tmp_path / "broken.csv", f"{header}\n{row}\n")
    with pytest.raises(MissingColumnError) as info:
        process_single_csv(csv_path)
    message = str(info.value)
    assert "broken.csv" in message and column in message
    # a ValueError per the contract, and a KeyError like upstream
    assert isinstance(info.value, ValueError) and isinstance(info.value, KeyError)


def test_empty_file(tmp_path):
    csv_path = _write(tmp_path / "empty.csv", "")
    with pytest.raises(ValueError, match=r"empty\.csv"):
        process_single_csv(csv_path)


def test_header_only_gives_empty_lists(tmp_path):
    csv_path = _write(tmp_path / "h.csv", "file,tag,reference_energy\n")
    assert process_single_csv(csv_path) == ([], [], [])


@pytest.mark.parametrize("value", ["abc", "", "nan", "inf"])
def test_bad_energy_names_file_line_and_column(tmp_path, value):
    csv_path = _write(
        tmp_path / "bad.csv", f"file,tag,reference_energy\na.xyz,a,1\nb.xyz,b,{value}\n"
    )
    with pytest.raises(ValueError, match=r"bad\.csv, line 3: column 'reference_energy'"):
        process_single_csv(csv_path)


def test_short_row_and_empty_path(tmp_path):
    short = _write(tmp_path / "short.csv", "file,tag,reference_energy\na.xyz,a\n")
    with pytest.raises(ValueError, match=r"short\.csv, line 2"):
        process_single_csv(short)
    empty = _write(tmp_path / "empty_path.csv", "path,tag,reference_energy\n ,a,1\n")
    with pytest.raises(ValueError, match=r"empty_path\.csv, line 2: column 'path'"):
        process_single_csv(empty)


# -- process_csv ------------------------------------------------------------------------------


@pytest.fixture
def two_csvs(tmp_path):
    a = _write(tmp_path / "a" / "a.csv", "file,tag,reference_energy\na0,a0,0\na1,a1,1\na2,a2,2\n")
    b = _write(tmp_path / "b" / "b.csv", "file,tag,reference_energy\nb0,b0,10\nb1,b1,11\n")
    return a, b


def test_process_csv_concatenates_in_order(two_csvs):
    a, b = two_csvs
    paths, tags, energies = process_csv([a, b])
    assert tags == ["a0", "a1", "a2", "b0", "b1"]
    assert energies == [0.0, 1.0, 2.0, 10.0, 11.0]
    assert paths[0] == a.parent.resolve() / "a0" and paths[-1] == b.parent.resolve() / "b1"


def test_process_csv_one_index_for_all_or_one_per_file(two_csvs):
    a, b = two_csvs
    assert process_csv((a, b), index=slice(1))[1] == ["a0", "b0"]
    assert process_csv([a, b], index=[slice(2, None), slice(None, 1)])[1] == ["a2", "b0"]
    with pytest.raises(ValueError, match="2 CSV files"):
        process_csv([a, b], index=[slice(1)])


@pytest.mark.parametrize("as_str", [False, True])
def test_process_csv_lone_path_is_one_file_and_index_honoured(two_csvs, as_str):
    a, _ = two_csvs
    path = str(a) if as_str else a
    assert process_csv(path)[1] == ["a0", "a1", "a2"]
    assert process_csv(path, index=slice(1, None))[1] == ["a1", "a2"]
    assert process_csv(path, index=[slice(2, None)])[1] == ["a2"]
    with pytest.raises(ValueError, match="one CSV file"):
        process_csv(path, index=[slice(1), slice(2)])


def test_process_csv_empty_list():
    assert process_csv([]) == ([], [], [])


@pytest.mark.timeout(60)
def test_no_pandas_import():
    code = (
        "import sys, types; m = types.ModuleType('chemfit'); m.__path__ = ['chemfit'];"
        "sys.modules['chemfit'] = m; import chemfit.chemistry.data_utils;"
        "assert 'pandas' not in sys.modules, 'pandas imported'"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60)


def test_contract_module_path():
    import chemfit.data_utils as shim

    assert shim.process_csv is process_csv and shim.process_single_csv is process_single_csv
    assert shim.DEFAULT_SLICE is DEFAULT_SLICE
    assert DEFAULT_SLICE.indices(3) == (0, 3, 1)
