"""Uploaded weights (POST /v1/weights): the architecture manifests, the safetensors check, storage, owner isolation,
quota, paging, delete, a job's `init`, and hostile files — each refused with a specific 4xx, storing nothing."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import pickle
import struct
import tempfile
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.numpy import save as st_save
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from app import cli
from app.api.middleware import MULTIPART_SLACK
from app.config import Settings
from app.core.arch_manifests import manifest, manifest_archs
from app.errors import InvalidSpec
from app.ingest.safetensors_check import WeightsFileError, check_weights_file
from app.main import create_app
from app.services.weights import weights_for_job
from app.tables import Job, Weights
from tests.factories import job_spec
from tests.support import ROOT, UploadHarness, http_scope, keyed_settings, make_key, stored_files, upload_harness

ARCHS = ("resnet18", "resnet50", "mobilenet_v3_small", "convnext_tiny")
SMALL = "mobilenet_v3_small"  # 2.5M parameters: 5 MB in float16, so most tests use it

# ------------------------------------------------------------------------------------------ file builders


def state_dict(
    arch: str = SMALL, *, dtype: Any = np.float16, classes: int | None = 10, stats: bool = True
) -> dict[str, np.ndarray]:
    """A state dict with the manifest's names and shapes: small deterministic values, a head for `classes`
    (None: no head), BatchNorm running statistics unless `stats` is False (a GroupNorm-trained network)."""
    m = manifest(arch)
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    for name, t in m.tensors.items():
        if t.role == "stat" and not stats:
            continue
        if t.role == "head":
            if classes is None:
                continue
            shape = (classes, *t.shape[1:])
        else:
            shape = t.shape
        if t.dtype == "I64":
            out[name] = np.array(7, dtype=np.int64).reshape(shape)
        elif name.endswith("running_var"):
            out[name] = np.ones(shape, dtype)
        else:
            out[name] = (rng.standard_normal(shape) * 0.02).astype(dtype)
    return out


@cache
def weights_bytes(arch: str = SMALL, **kw: Any) -> bytes:
    return st_save(state_dict(arch, **kw))


def raw_safetensors(header: dict[str, Any], data: bytes, *, length: int | None = None) -> bytes:
    """A file with exactly this header and data (safetensors' writer would refuse to write the hostile ones)."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def with_header(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """`data` (a valid file) with its header edited by `edit` and its tensor bytes unchanged."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    return raw_safetensors(header, data[8 + n :])


# ---------------------------------------------------------------------------------------------- harness

State = tuple[list[Path], int]


def state(settings: Settings) -> State:
    with create_engine(settings.resolved_database_url).connect() as conn:
        return stored_files(settings), int(conn.scalar(select(func.count()).select_from(Weights)) or 0)


def upload(client: TestClient, data: bytes, arch: str = SMALL, filename: str = "w.safetensors", **kw: Any) -> Any:
    form = {"arch": arch, **kw.pop("form", {})}
    return client.post("/v1/weights", files={"file": (filename, data)}, data=form, **kw)


class Harness(UploadHarness):
    """The upload harness on weights: a refused file leaves no row, stored file or temporary file."""

    def stored(self) -> State:
        return state(self.settings)

    def refuse(
        self, data: bytes, status: int, *needles: str, arch: str = SMALL, filename: str = "w.safetensors"
    ) -> str:
        return self.assert_refused(lambda: upload(self.client, data, arch, filename), status, *needles)


@pytest.fixture
def harness(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    return upload_harness(Harness, settings, tmp_path, monkeypatch)


# -------------------------------------------------------------------------------------------- manifests


def test_manifests_are_package_data_and_name_the_head() -> None:
    assert set(manifest_archs()) == set(ARCHS)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"app.core.arch_manifests" = ["*.json"]' in pyproject
    assert manifest("resnet18").head == ("fc.weight", "fc.bias")
    assert manifest("resnet50").parameters == 25_557_032
    assert manifest("mobilenet_v3_small").head == ("classifier.3.weight", "classifier.3.bias")
    assert manifest("convnext_tiny").head == ("classifier.2.weight", "classifier.2.bias")
    assert not manifest("convnext_tiny").has_batch_norm and manifest("resnet18").has_batch_norm
    for arch in ARCHS:
        m = manifest(arch)
        assert m.tensors[m.head[0]].shape[0] == 1000
        # Every BatchNorm statistic belongs to a norm layer whose affine weights are listed too.
        for key in m.keys("stat"):
            assert f"{key.rsplit('.', 1)[0]}.weight" in m.tensors
    with pytest.raises(ValueError, match="resnet18"):
        manifest("vgg16")


@pytest.mark.parametrize("arch", ARCHS)
def test_manifest_equals_torchvision_state_dict(arch: str) -> None:
    torch = pytest.importorskip("torch")
    models = pytest.importorskip("torchvision.models")
    from torch import nn

    net = getattr(models, arch)(weights=None)
    sd = net.state_dict()
    m = manifest(arch)
    assert list(m.tensors) == list(sd)
    for name, value in sd.items():
        spec = m.tensors[name]
        assert spec.shape == tuple(value.shape), name
        assert spec.dtype == {torch.float32: "F32", torch.int64: "I64"}[value.dtype], name
    modules = dict(net.named_modules())
    head_module = modules[m.head[0].rsplit(".", 1)[0]]
    assert isinstance(head_module, nn.Linear) and head_module.out_features == 1000
    last_linear = [name for name, mod in net.named_modules() if isinstance(mod, nn.Linear)][-1]
    assert m.head == (f"{last_linear}.weight", f"{last_linear}.bias")
    assert m.parameters == sum(p.numel() for p in net.parameters())
    # GroupNorm through `norm_layer=` keeps the BatchNorm affine names and shapes and drops the statistics.
    if arch.startswith("resnet"):
        gn = getattr(models, arch)(weights=None, norm_layer=lambda c: nn.GroupNorm(32, c))
        assert {k: tuple(v.shape) for k, v in gn.state_dict().items()} == {
            k: t.shape for k, t in m.tensors.items() if t.role != "stat"
        }


# ------------------------------------------------------------------------------------- the file check


def _check(data: bytes, arch: str = SMALL) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        path.write_bytes(data)
        return check_weights_file(path, manifest(arch))


def test_check_summarises_what_the_file_holds() -> None:
    bn = _check(weights_bytes())
    assert (bn.has_bn_stats, bn.has_gn_weights, bn.head_classes) == (True, False, 10)
    assert bn.dtypes == ["F16", "I64"] and bn.tensor_count == len(manifest(SMALL).tensors)
    assert bn.parameter_count == manifest(SMALL).parameters - 1000 * 1024 - 1000 + 10 * 1024 + 10
    gn = _check(weights_bytes(stats=False, classes=None))
    assert (gn.has_bn_stats, gn.has_gn_weights, gn.head_classes) == (False, True, None)
    f32 = _check(weights_bytes(dtype=np.float32, classes=1000))
    assert f32.dtypes == ["F32", "I64"] and f32.parameter_count == manifest(SMALL).parameters


def test_bfloat16_is_accepted_and_its_nan_found() -> None:
    sd = state_dict(classes=None, stats=False)
    header: dict[str, Any] = {}
    data = bytearray()
    for name, arr in sd.items():
        raw = (arr.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()  # bfloat16: the top half
        header[name] = {"dtype": "BF16", "shape": list(arr.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    summary = _check(raw_safetensors(header, bytes(data)))
    assert summary.dtypes == ["BF16"] and summary.has_gn_weights
    data[-2:] = struct.pack("<H", 0x7FC0)  # a bfloat16 NaN in the last tensor
    with pytest.raises(WeightsFileError, match="NaN or infinite"):
        _check(raw_safetensors(header, bytes(data)))


def test_mismatch_lists_missing_unexpected_and_wrong_shapes_with_counts() -> None:
    sd = state_dict()
    for name in [k for k in sd if k.startswith("features.12.")]:
        del sd[name]
    sd["features.0.0.weight"] = np.zeros((16, 1, 3, 3), np.float16)  # a grey-scale stem
    sd["extra.scale"] = np.zeros(3, np.float16)
    with pytest.raises(WeightsFileError) as e:
        _check(st_save(sd))
    msg = str(e.value)
    assert "torchvision's mobilenet_v3_small" in msg
    # The statistics are optional, but the other layers have theirs: these are missing too.
    missing = "features.12.0.weight, features.12.1.weight, features.12.1.bias, features.12.1.running_mean"
    assert f"5 missing ({missing}, features.12.1.running_var)" in msg, msg
    assert "1 unexpected (extra.scale)" in msg
    assert "1 with the wrong shape (features.0.0.weight: [16, 1, 3, 3], expected [16, 3, 3, 3])" in msg
    # Many problems: the first few of each kind are named, the count says how many there are.
    with pytest.raises(WeightsFileError, match=r"140 missing \(features\.0\.0\.weight, .* and 132 more\)"):
        _check(st_save({"x": np.zeros(1, np.float16)}))


def test_the_head_may_have_any_number_of_classes_but_not_another_shape() -> None:
    assert _check(weights_bytes(classes=3)).head_classes == 3
    sd = state_dict()
    sd["classifier.3.weight"] = np.zeros((10, 512), np.float16)  # in_features 1024 in the network
    with pytest.raises(WeightsFileError, match=r"classifier\.3\.weight: \[10, 512\], expected \[K, 1024\]"):
        _check(st_save(sd))
    sd = state_dict()
    sd["classifier.3.bias"] = np.zeros(9, np.float16)
    with pytest.raises(WeightsFileError, match="disagree on the number of classes"):
        _check(st_save(sd))


def test_some_batchnorm_statistics_but_not_all_is_refused() -> None:
    sd = state_dict()
    del sd["features.0.1.running_var"]
    with pytest.raises(WeightsFileError, match=r"1 missing \(features\.0\.1\.running_var\)"):
        _check(st_save(sd))
    sd = state_dict()
    del sd["features.0.1.num_batches_tracked"]  # the counter alone is optional
    assert _check(st_save(sd)).has_bn_stats


def test_data_parallel_names_get_a_hint() -> None:
    sd = {f"module.{k}": v for k, v in state_dict().items()}
    with pytest.raises(WeightsFileError, match=r"model\.module\.state_dict\(\)"):
        _check(st_save(sd))


def test_integer_parameters_are_refused() -> None:
    sd = state_dict()
    sd["features.0.1.weight"] = np.ones(16, np.int32)
    with pytest.raises(WeightsFileError, match=r"features\.0\.1\.weight: I32, expected one of F16/BF16/F32/F64"):
        _check(st_save(sd))


# ---------------------------------------------------------------------------------------------- the API


def test_upload_get_list_and_delete(client: TestClient, settings: Settings) -> None:
    data = weights_bytes()
    resp = upload(client, data, form={"name": "imagenet mobilenet"})
    assert resp.status_code == 201, resp.text
    w = resp.json()
    assert resp.headers["location"] == f"/v1/weights/{w['id']}"
    assert w["name"] == "imagenet mobilenet" and w["arch"] == SMALL
    assert w["sha256"] == hashlib.sha256(data).hexdigest() and w["size_bytes"] == len(data)
    assert w["has_bn_stats"] and not w["has_gn_weights"] and w["head_classes"] == 10
    assert w["created_at"].endswith("Z") or w["created_at"].endswith("+00:00")
    # Other tests of the session may have stored weights too: find this upload's file by its id.
    (stored,) = [p for p in stored_files(settings) if p.parent.name == "weights" and p.stem == w["id"]]
    assert stored.read_bytes() == data and stored.name == f"{w['id']}.safetensors"
    assert client.get(f"/v1/weights/{w['id']}").json() == w
    gn = upload(client, weights_bytes(stats=False, classes=None), filename="gn.safetensors").json()
    assert gn["name"] == "gn.safetensors" and gn["has_gn_weights"] and gn["head_classes"] is None
    listed = client.get("/v1/weights").json()
    assert [x["id"] for x in listed["items"]] == [gn["id"], w["id"]]
    assert listed["total"] == 2 and listed["next_offset"] is None
    assert client.delete(f"/v1/weights/{w['id']}").status_code == 204
    assert client.get(f"/v1/weights/{w['id']}").status_code == 404
    assert not stored.exists()
    assert client.delete(f"/v1/weights/{w['id']}").status_code == 404


def test_resnet18_in_float16_uploads(client: TestClient) -> None:
    resp = upload(client, weights_bytes("resnet18", classes=1000), arch="resnet18")
    assert resp.status_code == 201, resp.text
    assert resp.json()["parameter_count"] == manifest("resnet18").parameters
    assert resp.json()["head_classes"] == 1000


def test_list_pages(client: TestClient) -> None:
    data = weights_bytes(stats=False, classes=None)
    ids = [upload(client, data, form={"name": f"w{i}"}).json()["id"] for i in range(5)]
    first = client.get("/v1/weights", params={"limit": 2}).json()
    assert [x["id"] for x in first["items"]] == ids[::-1][:2] and first["next_offset"] == 2 and first["total"] == 5
    last = client.get("/v1/weights", params={"limit": 2, "offset": 4}).json()
    assert [x["id"] for x in last["items"]] == [ids[0]] and last["next_offset"] is None
    assert client.get("/v1/weights", params={"limit": 0}).status_code == 422


def test_unknown_arch_is_422_listing_the_known(harness: Any) -> None:
    with harness() as h:
        h.refuse(weights_bytes(), 422, "vgg16", "resnet18, resnet50", arch="vgg16")
        # Weights of one architecture uploaded as another: a mismatch, named.
        h.refuse(weights_bytes(), 422, "torchvision's resnet18", arch="resnet18")


def test_another_owner_gets_404_and_cannot_use_them(settings: Settings) -> None:
    with TestClient(create_app(keyed_settings(settings))) as c:
        alice, bob = make_key(c, "alice"), make_key(c, "bob")
        w = upload(c, weights_bytes(), headers=alice).json()
        assert c.get(f"/v1/weights/{w['id']}", headers=bob).status_code == 404
        assert c.delete(f"/v1/weights/{w['id']}", headers=bob).status_code == 404
        assert c.get("/v1/weights", headers=bob).json()["items"] == []
        resp = c.post("/v1/jobs", json=job_spec("digits", init={"weights_id": w["id"]}), headers=bob)
        assert resp.status_code == 422 and "not found" in resp.json()["detail"], resp.text
        assert c.get(f"/v1/weights/{w['id']}", headers=alice).status_code == 200


def test_weights_count_against_the_storage_quota_with_datasets(harness: Any) -> None:
    data = weights_bytes(stats=False, classes=None)
    with harness(max_dataset_bytes_per_owner=len(data) + 1000) as h:
        assert upload(h.client, data).status_code == 201
        detail = h.refuse(data, 429, "NORMBENCH_MAX_DATASET_BYTES_PER_OWNER", "DELETE /v1/weights/{id}")
        assert "datasets and weights" in detail


def test_submit_checks_init_and_delete_is_409_while_a_job_uses_them(client: TestClient, settings: Settings) -> None:
    w = upload(client, weights_bytes()).json()
    # The job's network is not the weights' architecture.
    resp = client.post("/v1/jobs", json=job_spec("digits", init={"weights_id": w["id"]}))
    assert resp.status_code == 422, resp.text
    assert f"weights '{w['id']}' are for {SMALL}, the job's model.arch is cnn" in resp.json()["detail"]
    resp = client.post("/v1/jobs", json=job_spec("digits", init={"weights_id": "nope"}))
    assert resp.status_code == 422 and "init.weights_id: weights 'nope' not found" in resp.json()["detail"]
    resp = client.post("/v1/jobs", json=job_spec("digits", init={"weights_id": w["id"], "backbone_lr_mult": 0}))
    assert resp.status_code == 422 and "backbone_lr_mult" in resp.json()["detail"]
    with Session(create_engine(settings.resolved_database_url)) as s:
        assert weights_for_job(s, "local", w["id"], SMALL).id == w["id"]
        with pytest.raises(InvalidSpec, match="not found"):
            weights_for_job(s, "someone-else", w["id"], SMALL)
        s.rollback()
        s.add(Job(owner="local", dataset_id="digits", weights_id=w["id"], spec={}, budget={}))
        s.commit()
    resp = client.delete(f"/v1/weights/{w['id']}")
    assert resp.status_code == 409 and "used by 1 job(s)" in resp.json()["detail"]


def test_cli_weights_upload_ls_rm(
    client: TestClient, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The CLI's HTTP client, answered by the app in-process.
    monkeypatch.setattr(cli, "Api", _InProcessApi.bind(client))
    path = tmp_path / "mobilenet.safetensors"
    path.write_bytes(weights_bytes())

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = run("weights", "upload", str(path), "--arch", SMALL, "--name", "pretrained")
    assert code == 0, err
    weights_id = out.strip()
    assert f"uploaded {path}: {SMALL}" in err and "with BatchNorm statistics" in err and weights_id in err
    code, out, _ = run("weights", "ls")
    assert code == 0 and weights_id in out and "pretrained" in out and "BN statistics" in out
    assert out.splitlines()[0].split() == ["id", "name", "arch", "norms", "head", "dtypes", "size", "created"]
    code, out, _ = run("weights", "ls", "--json")
    assert [w["id"] for w in json.loads(out)] == [weights_id]
    pickle_path = tmp_path / "model.pt"
    pickle_path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    code, _, err = run("weights", "upload", str(pickle_path), "--arch", SMALL)
    assert code == 1 and err.startswith("error: ") and "pickle" in err
    code, _, err = run("weights", "rm", weights_id)
    assert code == 0 and f"deleted weights {weights_id}" in err
    code, _, err = run("weights", "rm", weights_id)
    assert code == 1 and "not found" in err
    with pytest.raises(SystemExit):
        cli.main(["weights", "upload", str(path)])  # --arch is required


class _InProcessApi(cli.Api):
    test_client: TestClient

    @classmethod
    def bind(cls, test_client: TestClient) -> type[_InProcessApi]:
        return type("BoundApi", (cls,), {"test_client": test_client})

    def __init__(self, base_url: str, api_key: str | None, timeout: float) -> None:
        self.base_url = base_url
        self.client = self.test_client

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------- hostile files


def test_a_raw_pickle_is_refused(harness: Any) -> None:
    with harness() as h:
        evil = pickle.dumps({"conv1.weight": [0.0] * 10}, protocol=4)
        h.refuse(evil, 422, "pickle", "never accepted", "safetensors.torch", "save_file", filename="w.pt")
        h.refuse(pickle.dumps([1], protocol=2), 422, "pickle", filename="w.bin")


def test_a_torch_save_zip_is_refused(harness: Any) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # torch.save's layout: archive/data.pkl beside the tensor storages
        zf.writestr("archive/data.pkl", pickle.dumps({"conv1.weight": 0}, protocol=2))
        zf.writestr("archive/version", "3\n")
    with harness() as h:
        h.refuse(buf.getvalue(), 422, "zip archive", "torch.save", "save_file", filename="model.pth")


def test_a_truncated_file_is_refused(harness: Any) -> None:
    data = weights_bytes()
    with harness() as h:
        h.refuse(data[: len(data) // 2], 422, "truncated", "upload the complete file")
        h.refuse(data[:100], 422, "truncated")
        h.refuse(data[:5], 422, "too short")
        h.refuse(b"", 422, "empty")


def test_a_header_claiming_huge_tensors_is_refused(harness: Any) -> None:
    huge = {"conv1.weight": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 4 * 2**40]}}
    with harness() as h:
        h.refuse(raw_safetensors(huge, b"\0" * 64), 422, "truncated or its header lies", "conv1.weight")
        # A header length beyond any real header (the first 8 bytes of something else, or a lie).
        h.refuse(struct.pack("<Q", 2**40) + b"{}", 422, "over the limit")
        h.refuse(raw_safetensors({}, b"", length=10_000), 422, "truncated")


def test_a_header_that_is_not_json_is_refused(harness: Any) -> None:
    with harness() as h:
        h.refuse(struct.pack("<Q", 11) + b"{not json!}", 422, "not valid JSON")
        h.refuse(struct.pack("<Q", 4) + b"[1] ", 422, "not a JSON object")
        h.refuse(struct.pack("<Q", 3) + b"\xff\xfe{", 422, "not a JSON object")
        dup = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}'
        h.refuse(struct.pack("<Q", len(dup)) + dup + b"\0" * 4, 422, "appears twice")


def test_overlapping_offsets_holes_and_lying_sizes_are_refused(harness: Any) -> None:
    a = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    with harness() as h:
        overlap = {"a": a, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
        h.refuse(raw_safetensors(overlap, b"\0" * 12), 422, "overlaps")
        hole = {"a": a, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}
        h.refuse(raw_safetensors(hole, b"\0" * 16), 422, "belong to no tensor")
        h.refuse(raw_safetensors({"a": a}, b"\0" * 12), 422, "trailing bytes")
        wrong_size = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
        h.refuse(raw_safetensors(wrong_size, b"\0" * 8), 422, "needs 12")
        h.refuse(raw_safetensors({"a": {**a, "dtype": "F33"}}, b"\0" * 8), 422, "unknown dtype 'F33'")
        h.refuse(raw_safetensors({"a": {**a, "shape": [-2]}}, b"\0" * 8), 422, "invalid shape")
        h.refuse(raw_safetensors({"a": {**a, "extra": 1}}, b"\0" * 8), 422, "exactly `dtype`")
        h.refuse(raw_safetensors({"__metadata__": {"k": 1}}, b""), 422, "__metadata__")


def test_wrong_shapes_are_refused_with_the_list(harness: Any) -> None:
    data = with_header(weights_bytes(), lambda hd: hd["features.0.0.weight"].update(shape=[16, 3, 9, 1]))
    with harness() as h:
        h.refuse(data, 422, "1 with the wrong shape (features.0.0.weight: [16, 3, 9, 1], expected [16, 3, 3, 3])")


def test_non_finite_values_are_refused(harness: Any) -> None:
    sd = state_dict()
    sd["features.1.block.0.0.weight"][0, 0, 0, 0] = np.inf
    with harness() as h:
        h.refuse(st_save(sd), 422, "features.1.block.0.0.weight", "NaN or infinite")


def test_a_file_just_over_the_cap_is_413(harness: Any) -> None:
    data = weights_bytes()
    with harness(max_weights_bytes=len(data) - 1) as h:  # within the multipart slack: the service's own count
        h.refuse(data, 413, "NORMBENCH_MAX_WEIGHTS_BYTES")


MULTIPART_HEAD = (
    b'--nbb\r\nContent-Disposition: form-data; name="arch"\r\n\r\nresnet18\r\n'
    b'--nbb\r\nContent-Disposition: form-data; name="file"; filename="zeros.safetensors"\r\n'
    b"Content-Type: application/octet-stream\r\n\r\n"
)


def test_two_gib_of_zeros_is_cut_off_in_bounded_memory(harness: Any) -> None:
    """A generator body of 2 GiB of zeros (no Content-Length) against a 1 MiB cap: 413 once the cap is passed,
    never reading the rest, never holding it."""
    total = 2 * 2**30

    def body() -> Iterator[bytes]:
        yield MULTIPART_HEAD
        zeros = b"\0" * 2**20
        for _ in range(total // len(zeros)):
            yield zeros

    with harness(max_weights_bytes=2**20) as h:
        before = state(h.settings)
        parts = body()
        pulled = 0
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            nonlocal pulled
            chunk = next(parts, b"")
            pulled += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunk)}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = http_scope("POST", "/v1/weights", [(b"content-type", b"multipart/form-data; boundary=nbb")])
        tracemalloc.start()
        try:
            asyncio.run(create_app(h.settings)(scope, receive, send))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert sent[0]["status"] == 413
        detail = json.loads(sent[1]["body"])["detail"]
        assert "NORMBENCH_MAX_WEIGHTS_BYTES" in detail and "1.0 MiB" in detail
        assert pulled <= 2**20 + MULTIPART_SLACK + 2**20 + len(MULTIPART_HEAD), pulled
        assert peak < 64 * 2**20, f"peak traced memory {peak} bytes"
        h.assert_nothing_left(before)


def test_readme_shows_the_weights_workflow() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "curl -F file=@resnet18.safetensors -F arch=resnet18" in readme
    assert "normbench weights upload resnet18.safetensors --arch resnet18" in readme
    assert "NORMBENCH_MAX_WEIGHTS_BYTES" in readme and '"init": {"weights_id"' in readme
