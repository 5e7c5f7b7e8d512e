"""One registry entry makes a method: this module adds one (options + engine class + one register line) and
nothing else, and the spec, the form, /openapi.json and the engine all take it."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import Field

from quantfarm import registry
from quantfarm.errors import ValidationFailed
from quantfarm.options import Strict
from workers.engine.methods.rtn import RTNMethod


class ToyOptions(Strict):
    bits: Literal[4, 8] = Field(8, description="Bits per toy weight")
    group_size: Literal[-1, 32] = Field(32, description="Toy columns per scale")
    sym: bool = Field(True, description="Toy symmetry")
    sparkle: float = Field(0.5, ge=0, le=1, description="How much the toy sparkles")


class ToyMethod(RTNMethod):
    """Round-to-nearest under another name: the engine side of the toy method."""

    name = "toy"


TOY = registry.MethodEntry("toy", ToyOptions, f"{__name__}:ToyMethod", ("gptq", "compressed-tensors"), "Toy",
                           "A toy method registered by a test.", ("toy",))


@pytest.fixture
def toy():
    registry.register_method(TOY)
    yield TOY
    registry.unregister_method("toy")


def test_a_registered_method_is_in_the_spec_with_its_options_and_formats(toy):
    from quantfarm import spec

    assert "toy" in spec.METHODS and spec.METHOD_OPTIONS["toy"] is ToyOptions
    job = spec.parse_spec({"model": {"source": "local", "path": "/m"}, "method": "toy", "options": {"sparkle": 0.25},
                           "formats": ["compressed-tensors", "gptq"]})
    assert type(job).__name__ == "ToyJob" and job.options == ToyOptions(sparkle=0.25) and job.formats == ["compressed-tensors", "gptq"]
    assert spec.parse_spec({"model": {"source": "local", "path": "/m"}, "method": "toy"}).formats == ["gptq"]
    with pytest.raises(ValidationFailed) as err:
        spec.parse_spec({"model": {"source": "local", "path": "/m"}, "method": "toy", "options": {"sparkle": 2}})
    assert err.value.details["fields"] == {"options.sparkle": "Input should be less than or equal to 1"}
    with pytest.raises(ValidationFailed) as err:
        spec.parse_spec({"model": {"source": "local", "path": "/m"}, "method": "toy", "formats": ["awq"]})
    assert err.value.details["fields"] == {"formats.0": "toy cannot write 'awq'; it writes: gptq, compressed-tensors"}


def test_unregistered_it_is_an_unknown_method_again(toy):
    from quantfarm import spec

    registry.unregister_method("toy")
    with pytest.raises(ValidationFailed) as err:
        spec.parse_spec({"model": {"source": "local", "path": "/m"}, "method": "toy"})
    assert "unknown value 'toy'" in err.value.details["fields"]["method"]
    assert "toy" not in spec.METHODS


def test_openapi_documents_the_registered_method(lite, toy):
    doc = lite.test_client().get("/openapi.json").get_json()
    schemas = doc["components"]["schemas"]
    assert schemas["ToyOptions"]["properties"]["sparkle"]["description"] == "How much the toy sparkles"
    assert {"$ref": "#/components/schemas/ToyJob"} in schemas["JobSpec"]["oneOf"]
    assert schemas["JobSpec"]["discriminator"]["mapping"]["toy"] == "#/components/schemas/ToyJob"
    formats = schemas["ToyJob"]["properties"]["formats"]
    assert formats["items"]["enum"] == ["gptq", "compressed-tensors"] and formats["default"] == ["gptq"]
    registry.unregister_method("toy")
    again = lite.test_client().get("/openapi.json").get_json()["components"]["schemas"]
    assert "ToyJob" not in again and {"$ref": "#/components/schemas/ToyJob"} not in again["JobSpec"]["oneOf"]


def test_the_form_offers_the_method_and_submits_its_options_and_formats(lite, toy):
    client = lite.test_client()
    page = client.get("/").data.decode()
    for text in ('id="f-method-toy"', "A toy method registered by a test.", 'name="options.toy.sparkle"',
                 "How much the toy sparkles", 'name="formats.toy.compressed-tensors"'):
        assert text in page, text
    resp = client.post("/", data={"model.source": "local", "model.path": "/models/tiny", "method": "toy",
                                  "options.toy.sparkle": "0.75", "options.toy.bits": "4", "options.toy.group_size": "32", "options.toy.sym": "on",
                                  "formats.toy.compressed-tensors": "on", "calibration.kind": "builtin",
                                  "calibration.builtin": "builtin:code", "destination.store": "on"})
    assert resp.status_code == 303, resp.data[-1500:]
    job_id = resp.headers["Location"].rstrip("/").rsplit("/", 1)[-1]
    spec = client.get(f"/v1/jobs/{job_id}").get_json()["spec"]
    assert spec["method"] == "toy" and spec["options"]["sparkle"] == 0.75 and spec["options"]["bits"] == 4
    assert spec["formats"] == ["compressed-tensors"]


def test_the_engine_runs_the_registered_method(toy, tiny_llama, tmp_path):
    import torch

    from quantfarm.spec import Calibration
    from storage.artifacts import LocalStore
    from workers.engine.methods import METHODS, method_for
    from workers.engine.pipeline import QuantizeRequest
    from workers.engine.run import quantize

    assert METHODS["toy"] is ToyMethod and isinstance(method_for("toy", ToyOptions()), ToyMethod)
    req = QuantizeRequest(source_dir=tiny_llama, method="toy", options=ToyOptions(bits=4), calibration=Calibration(),
                          formats=["gptq", "compressed-tensors"])
    res = quantize(req, LocalStore(tmp_path / "ckpt"), tmp_path / "out", device=torch.device("cpu"))
    assert [(o.format, o.out_dir.name) for o in res.outputs] == [("gptq", "out"), ("compressed-tensors", "out-compressed-tensors")]
    assert res.quantization_config["meta"]["method"] == "toy"
    assert "tags:\n- \"quantfarm\"\n- \"toy\"" in (tmp_path / "out-compressed-tensors" / "README.md").read_text()
