"""Reading reference-data tables: which structure files to fit, their tags and energies.

A table is a CSV file with a header row and the columns

* ``path`` (taken as written: absolute, or relative to the working directory) **or** ``file``
  (relative to the folder of the CSV file); ``path`` wins when both are present,
* ``tag``, a short label, and
* ``reference_energy``, a number.

Other columns are ignored. Only the standard library's :mod:`csv` module is used.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DEFAULT_SLICE", "MissingColumnError", "process_csv", "process_single_csv"]

DEFAULT_SLICE = slice(None)

PathLike = str | os.PathLike


class MissingColumnError(ValueError, KeyError):
    """A required column is missing from a reference-data CSV file.

    Also a ``KeyError``, which upstream chemfit raised, so existing handlers keep working.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _select(rows: list, index: slice | int, csv_path: Path) -> list:
    if isinstance(index, slice):
        return rows[index]
    if isinstance(index, int) and not isinstance(index, bool):
        try:
            return [rows[index]]
        except IndexError:
            raise IndexError(
                f"index={index} is out of range for {csv_path}, which has {len(rows)} rows"
            ) from None
    raise TypeError(
        f"index must be a slice or an int, got {index!r} ({type(index).__name__}); "
        "use e.g. slice(0, 10)"
    )


def process_single_csv(
    path_to_csv: PathLike, index: slice | int = DEFAULT_SLICE
) -> tuple[list[Path], list[str], list[float]]:
    """Read one reference-data CSV file.

    Parameters
    ----------
    path_to_csv : str or os.PathLike
        The CSV file (see the module docstring for its columns).
    index : slice or int
        Which data rows to return, applied after reading; all rows by default.

    Returns
    -------
    paths : list of Path
        The structure files; ``file`` entries are resolved against the CSV's folder.
    tags : list of str
    energies : list of float

    Raises
    ------
    FileNotFoundError
        The CSV file does not exist.
    MissingColumnError
        A required column is missing (a ``ValueError`` and a ``KeyError``).
    ValueError
        An empty path or a reference energy that is not a finite number; the message names the
        file, the line and the column.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "data.csv").write_text(
    ...     "file,tag,reference_energy\\n"
    ...     "dimer.xyz,dimer,-1.5\\n"
    ...     "trimer.xyz,trimer,-2.25\\n")
    >>> paths, tags, energies = process_single_csv(folder / "data.csv")
    >>> [p.relative_to(folder.resolve()).as_posix() for p in paths], tags, energies
    (['dimer.xyz', 'trimer.xyz'], ['dimer', 'trimer'], [-1.5, -2.25])
    >>> process_single_csv(folder / "data.csv", slice(1, None))[1]
    ['trimer']
    """
    csv_path = Path(path_to_csv)
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"reference-data CSV file {str(csv_path)!r} does not exist; check path_to_csv"
        )
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, skipinitialspace=True)
        header = next(reader, None)
        if header is None:
            raise MissingColumnError(
                f"{csv_path}: the file is empty; it needs a header row with the columns "
                "'path' or 'file', 'tag' and 'reference_energy'"
            )
        columns = [name.strip() for name in header]
        if "path" in columns:
            path_column = "path"
        elif "file" in columns:
            path_column = "file"
        else:
            raise MissingColumnError(
                f"{csv_path}: missing column 'path' or 'file' (found {columns}); add a 'path' "
                "column (relative to the working directory) or a 'file' column (relative to "
                "the CSV file)"
            )
        for required in ("tag", "reference_energy"):
            if required not in columns:
                raise MissingColumnError(
                    f"{csv_path}: missing column {required!r} (found {columns}); add it"
                )
        i_path = columns.index(path_column)
        i_tag = columns.index("tag")
        i_energy = columns.index("reference_energy")

        base = csv_path.parent.resolve()
        rows: list[tuple[Path, str, float]] = []
        for record in reader:
            if not record or all(not cell.strip() for cell in record):
                continue  # blank line
            line = reader.line_num
            if len(record) < len(columns):
                raise ValueError(
                    f"{csv_path}, line {line}: expected {len(columns)} fields, got "
                    f"{len(record)}; fill in the missing columns"
                )
            raw_path = record[i_path].strip()
            if not raw_path:
                raise ValueError(f"{csv_path}, line {line}: column {path_column!r} is empty")
            path = Path(raw_path) if path_column == "path" else base / raw_path
            raw_energy = record[i_energy].strip()
            try:
                energy = float(raw_energy)
            except ValueError:
                energy = math.nan
            if not math.isfinite(energy):
                raise ValueError(
                    f"{csv_path}, line {line}: column 'reference_energy' must be a finite "
                    f"number, got {raw_energy!r}"
                )
            rows.append((path, record[i_tag].strip(), energy))

    selected = _select(rows, index, csv_path)
    return (
        [r[0] for r in selected],
        [r[1] for r in selected],
        [r[2] for r in selected],
    )


def process_csv(
    paths_to_csv: PathLike | Sequence[PathLike],
    index: slice | int | Sequence[slice | int] = DEFAULT_SLICE,
) -> tuple[list[Path], list[str], list[float]]:
    """Read one or several reference-data CSV files and concatenate their rows.

    Parameters
    ----------
    paths_to_csv : str, os.PathLike or sequence of them
        One CSV file, or several. A lone ``str`` or path is one file.
    index : slice, int or sequence of them
        Applied to every file, or one entry per file.

    Returns
    -------
    paths, tags, energies
        As in :func:`process_single_csv`, concatenated in file order.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> for name in ("a", "b"):
    ...     _ = (folder / f"{name}.csv").write_text(
    ...         f"file,tag,reference_energy\\n{name}1.xyz,{name}1,1\\n{name}2.xyz,{name}2,2\\n")
    >>> process_csv([folder / "a.csv", folder / "b.csv"], index=[slice(1), slice(1, 2)])[1]
    ['a1', 'b2']
    >>> process_csv(str(folder / "a.csv"), index=slice(1, None))[1]
    ['a2']
    """
    if isinstance(paths_to_csv, (str, os.PathLike)):
        if not isinstance(index, (slice, int)) and isinstance(index, Sequence):
            if len(index) != 1:
                raise ValueError(
                    f"one CSV file was given but index has {len(index)} entries; pass one "
                    "slice or a list with one slice"
                )
            index = index[0]
        return process_single_csv(paths_to_csv, index)

    files = list(paths_to_csv)
    if isinstance(index, (slice, int)):
        indices = [index] * len(files)
    else:
        indices = list(index)
        if len(indices) != len(files):
            raise ValueError(
                f"index has {len(indices)} entries but {len(files)} CSV files were given; "
                "pass one slice for all files or one per file"
            )

    paths: list[Path] = []
    tags: list[str] = []
    energies: list[float] = []
    for csv_file, idx in zip(files, indices):
        p, t, e = process_single_csv(csv_file, idx)
        paths += p
        tags += t
        energies += e
    return paths, tags, energies
