import pytest

from fedgen.files import atomic_dir, atomic_file, write_json


def test_a_failed_block_leaves_the_old_directory_and_no_scratch(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as staging:
            (staging / "new.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]


def test_a_successful_block_replaces_the_directory(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as staging:
        (staging / "w.bin").write_bytes(b"1")
    assert [p.name for p in target.iterdir()] == ["w.bin"]


def test_atomic_file_keeps_the_suffix_and_cleans_up(tmp_path):
    with pytest.raises(ValueError):
        with atomic_file(tmp_path / "sheet.png") as staging:
            assert staging.suffix == ".png"
            staging.write_bytes(b"x")
            raise ValueError
    assert list(tmp_path.iterdir()) == []
    write_json(tmp_path / "a.json", {"eps": float("inf")})
    assert (tmp_path / "a.json").read_text() == '{\n  "eps": Infinity\n}'
