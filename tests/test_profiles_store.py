"""Profiles on disk: a saved profile reads back the same; names cannot leave the folder; files that
are not our profiles (a pickle renamed .safetensors, a zip, a truncated copy, something too large,
another safetensors file) are refused with a message naming the file, and nothing is unpickled."""

import os
import pickle

import pytest
import torch

from lib_identity import profiles as P


def sample_profile(name="alice", n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, 512, generator=g) * 20
    return P.Profile(
        name=name, created="2026-12-07T06:00:00+00:00", pictures=tuple(f"{i:08x}" for i in range(n)),
        left_out=({"picture": n + 1, "hash": "deadbeef", "why": "no face"},), face=2,
        faces={"buffalo_l": P.FaceSet(normed=torch.nn.functional.normalize(raw, dim=-1), raw=raw,
                                      keypoints=torch.rand(n, 5, 2, generator=g) * 100,
                                      sizes=torch.tensor([[640, 480]] * n))},
        clip={("clip-vit-h", "image_embeds"): torch.randn(n, 1024, generator=g),
              ("clip-vit-h", "hidden_states[-2]"): torch.randn(n, 17, 64, generator=g)},
        face_clip={("clip-vit-h", "buffalo_l"): torch.randn(n, 17, 64, generator=g)},
        photomaker={"0123abcd": P.PhotoMakerEmbeds(file="photomaker-v2.bin", variant="photomaker-v2",
                                                   id_embeds=torch.randn(2 * n, 32, generator=g),
                                                   used=tuple(range(n)))},
    )


def test_a_saved_profile_reads_back_with_the_same_numbers_and_is_listed(tmp_path):
    folder = tmp_path / "models" / "identity" / "profiles"
    made = sample_profile()
    path = P.save_profile(made, str(folder))
    assert path == str(folder / "alice.safetensors") and os.path.isfile(path)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # as readable as any model file, not 0600
    back = P.load_profile(str(folder), "alice")
    assert back.pictures == made.pictures and back.face == 2 and back.left_out == made.left_out
    for key in ("normed", "raw", "keypoints"):
        assert torch.equal(getattr(back.faces["buffalo_l"], key), getattr(made.faces["buffalo_l"], key))
    assert torch.equal(back.faces["buffalo_l"].sizes, made.faces["buffalo_l"].sizes)
    assert all(torch.equal(back.clip[k], v) for k, v in made.clip.items()) and back.clip.keys() == made.clip.keys()
    assert torch.equal(back.face_clip[("clip-vit-h", "buffalo_l")], made.face_clip[("clip-vit-h", "buffalo_l")])
    pm = back.photomaker["0123abcd"]
    assert torch.equal(pm.id_embeds, made.photomaker["0123abcd"].id_embeds) and pm.used == (0, 1, 2)
    listed = P.list_profiles(str(folder))
    assert [e["name"] for e in listed] == ["alice"]
    entry = listed[0]
    assert entry == dict(back.summary(), bytes=os.path.getsize(path))
    assert entry["pictures"] == 3 and entry["packs"] == ["buffalo_l"]
    assert entry["photomaker"] == ["photomaker-v2.bin [0123abcd]"]
    assert "clip-vit-h image_embeds" in entry["encoders"] and "clip-vit-h face crop (buffalo_l)" in entry["encoders"]
    # no picture in the file: only tensors of the encodings and the JSON document
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        assert all(k.split("/")[0] in ("faces", "clip", "face_clip", "photomaker") for k in f.keys())
        assert set(f.metadata()) == {"format", "version", "profile"}


def test_an_existing_name_is_kept_unless_overwrite_is_asked_and_delete_removes_it(tmp_path):
    P.save_profile(sample_profile(seed=1), str(tmp_path))
    with pytest.raises(P.ProfileExistsError, match="exists; choose another name, or overwrite"):
        P.save_profile(sample_profile(seed=2), str(tmp_path))
    assert torch.equal(P.load_profile(str(tmp_path), "alice").clip[("clip-vit-h", "image_embeds")],
                       sample_profile(seed=1).clip[("clip-vit-h", "image_embeds")])
    P.save_profile(sample_profile(seed=2), str(tmp_path), overwrite=True)
    assert torch.equal(P.load_profile(str(tmp_path), "alice").clip[("clip-vit-h", "image_embeds")],
                       sample_profile(seed=2).clip[("clip-vit-h", "image_embeds")])
    P.delete_profile(str(tmp_path), "alice")
    assert P.list_profiles(str(tmp_path)) == []
    with pytest.raises(P.ProfileNotFoundError, match="no profile 'alice'"):
        P.delete_profile(str(tmp_path), "alice")
    with pytest.raises(P.ProfileNotFoundError, match="no profile 'alice'"):
        P.load_profile(str(tmp_path), "alice")


@pytest.mark.parametrize("name", ["", "../alice", "..", "a/b", "a\\b", "/etc/passwd", ".hidden", "a..b", " alice",
                                  "alice.", "con", "x" * 65, "a\x00b", "a\nb", "C:evil", 7, None])
def test_names_that_could_leave_the_folder_or_trouble_a_filesystem_are_refused(tmp_path, name):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    with pytest.raises(P.ProfileError, match="cannot name a profile|must be text"):
        P.profile_path(str(tmp_path / "profiles"), name)
    with pytest.raises(P.ProfileError):
        P.delete_profile(str(tmp_path / "profiles"), name)
    assert (tmp_path / "secret.safetensors").exists()


def test_names_people_use_are_accepted():
    for name in ("alice", "Alice Smith", "bob_2", "zoë", "anna-maria (2024)", "v1.2", "李雷"):
        assert P.check_name(name) == name


def test_a_pickle_renamed_safetensors_is_refused_without_being_unpickled(tmp_path):
    marker = tmp_path / "ran"

    class Bomb:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.safetensors").write_bytes(pickle.dumps({"x": Bomb()}))
    with pytest.raises(P.ProfileError, match="is a pickle .*safetensors only"):
        P.load_profile(str(tmp_path), "evil")
    torch.save({"x": torch.zeros(3)}, tmp_path / "zipped.safetensors")
    with pytest.raises(P.ProfileError, match="zip archive"):
        P.load_profile(str(tmp_path), "zipped")
    assert not marker.exists()
    listed = {e["name"]: e for e in P.list_profiles(str(tmp_path))}
    assert "pickle" in listed["evil"]["error"] and "zip" in listed["zipped"]["error"]
    assert not marker.exists()


def test_a_truncated_file_is_named_with_both_sizes(tmp_path):
    path = P.save_profile(sample_profile(), str(tmp_path))
    data = open(path, "rb").read()
    for cut in (4, len(data) // 2):
        with open(path, "wb") as fh:
            fh.write(data[:-cut])
        with pytest.raises(P.ProfileError, match=rf"truncated: {len(data) - cut} bytes on disk, its header describes {len(data)}"):
            P.load_profile(str(tmp_path), "alice")


def test_other_safetensors_files_and_damaged_profiles_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(P.ProfileError, match="is not an identity profile"):
        P.load_profile(str(tmp_path), "lora")
    tensors, metadata = sample_profile().to_file()
    tensors["faces/buffalo_l/normed"] = tensors["faces/buffalo_l/normed"][:2]  # rows do not match the pictures
    save_file(tensors, str(tmp_path / "damaged.safetensors"), metadata=metadata)
    with pytest.raises(P.ProfileError, match=r"damaged identity profile .*faces/buffalo_l/normed"):
        P.load_profile(str(tmp_path), "damaged")


def test_the_size_is_bounded_on_save_and_on_load(tmp_path, monkeypatch):
    from lib_identity.profiles import store

    path = P.save_profile(sample_profile(), str(tmp_path))
    monkeypatch.setattr(store, "MAX_PROFILE_BYTES", os.path.getsize(path) // 2)
    with pytest.raises(P.ProfileError, match="more than a profile can be"):
        P.load_profile(str(tmp_path), "alice")
    with pytest.raises(P.ProfileError, match="build it from fewer pictures"):
        P.save_profile(sample_profile(name="bob"), str(tmp_path))
    assert not (tmp_path / "bob.safetensors").exists()
