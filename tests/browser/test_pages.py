"""The web pages in real headless Chromium against `quantfarm run` (see conftest.py).

Models are tiny local Llamas (the Hub is unreachable here); every job really runs in the
stack's worker. Screenshots go to test-output/screenshots/.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from quantfarm.spec import METHOD_OPTIONS, METHODS

pytestmark = pytest.mark.browser

JOB_URL = re.compile(r"/jobs/(job_[0-9a-z]{26})$")
LONG = 120_000  # ms: a job waits behind the other tests' jobs on one worker

# Records every value the progress bar takes, from the first render on (runs before the page's scripts).
PROGRESS_RECORDER = """
window.__progress = [];
document.addEventListener("DOMContentLoaded", () => {
  const bar = document.getElementById("progress");
  if (!bar) return;
  const read = () => window.__progress.push(Number(bar.getAttribute("aria-valuenow")));
  read();
  new MutationObserver(read).observe(bar, { attributes: true, attributeFilter: ["aria-valuenow"] });
});
"""


def choose(page, input_id: str) -> None:
    """Click the visible label of a (visually hidden) radio, as a person would."""
    page.locator(f"label[for={input_id}]").click()
    expect(page.locator(f"#{input_id}")).to_be_checked()


def field_of(page, input_id: str):
    return page.locator(".field", has=page.locator(f"#{input_id}"))


def job_count(stack) -> int:
    return len(stack.get("/v1/jobs?limit=200").json()["items"])


def test_form_shows_only_the_chosen_methods_options_with_the_schemas_defaults(page):
    page.goto("/")
    unlabelled = page.evaluate("""[...document.querySelectorAll('#job-form input, #job-form select, #job-form textarea')]
        .filter(e => !e.labels.length).map(e => e.name)""")
    assert unlabelled == [], f"inputs without a label: {unlabelled}"
    for method in METHODS:
        choose(page, f"f-method-{method}")
        for other in METHODS:
            group = page.locator(f"#f-options-{other}")
            expect(group).to_be_visible() if other == method else expect(group).to_be_hidden()
        for name, prop in METHOD_OPTIONS[method].model_json_schema()["properties"].items():
            box = page.locator(f"#f-options-{method}-{name}".replace("_", "-"))
            choices = prop.get("enum") or ([prop["const"]] if "const" in prop else None)
            if choices:
                assert box.locator("option").all_inner_texts() == [str(c) for c in choices]
                expect(box).to_have_value(str(prop["default"]))
            elif prop["type"] == "boolean":
                expect(box).to_be_checked(checked=prop["default"])
            elif prop["type"] == "array":
                expect(box).to_have_value("")
            else:
                expect(box).to_have_value(str(prop["default"]))
            expect(page.locator(f"#{box.get_attribute('id')}-help")).to_contain_text(prop["description"])
    # The model source and the calibration choice toggle their inputs the same way.
    choose(page, "f-model-source-s3")
    expect(page.get_by_role("textbox", name="S3 URI")).to_be_visible()
    expect(page.get_by_role("textbox", name="Hub model id")).to_be_hidden()
    choose(page, "f-calibration-kind-texts")
    expect(page.get_by_role("textbox", name="Calibration texts")).to_be_visible()
    expect(page.locator("#f-calibration-builtin")).to_be_hidden()


def test_submit_an_rtn_job_and_watch_it_succeed_without_a_reload(page, stack, small_model, shots):
    page.add_init_script(PROGRESS_RECORDER)
    page.goto("/")
    choose(page, "f-model-source-local")
    page.get_by_role("textbox", name="Local path").fill(str(small_model))
    choose(page, "f-method-rtn")
    page.locator("#f-options-rtn-bits").select_option("8")
    page.get_by_role("spinbutton", name="Sequence length").fill("64")
    page.get_by_label("Measure perplexity before and after").check()
    page.screenshot(path=shots / "01-form.png", full_page=True, animations="disabled")

    page.get_by_role("button", name="Start quantization").click()
    page.wait_for_url(JOB_URL)
    job_id = JOB_URL.search(page.url).group(1)
    page.evaluate("window.__sameDocument = 'still here'")
    first = page.evaluate("JSON.parse(document.getElementById('job-data').textContent).job")
    assert first["status"] in ("queued", "running"), "the first render should catch the job before it ends"
    expect(page.get_by_role("button", name="Cancel job")).to_be_visible()

    expect(page.locator("#job-badge")).to_have_text(re.compile("succeeded", re.I), timeout=LONG)
    expect(page.locator("#progress-text")).to_have_text("Done: 2 layers.")
    assert page.evaluate("window.__sameDocument") == "still here", "the page reloaded"
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
    seen = page.evaluate("window.__progress")
    assert seen[0] < 100 and seen[-1] == 100 and seen == sorted(seen), seen

    job = stack.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["spec"]["options"] == {"bits": 8, "group_size": 128, "sym": True}
    assert job["spec"]["calibration"]["seq_len"] == 64 and job["spec"]["evaluate"] is True
    # The timeline got the closing events; allowed actions only: none for a succeeded job.
    expect(page.locator("#timeline")).to_contain_text("Layer 2 of 2")
    expect(page.locator("#timeline li").last).to_contain_text("succeeded")
    expect(page.get_by_role("button", name="Cancel job")).to_be_hidden()
    expect(page.get_by_role("button", name="Retry from checkpoints")).to_be_hidden()

    # Metrics chart and the per-layer error plot, with the API's numbers.
    mt = job["metrics"]
    ppl = page.locator("figure[data-chart=perplexity] svg")
    expect(ppl).to_have_attribute("aria-label", re.compile(rf"before {mt['perplexity_before']:.2f}, after {mt['perplexity_after']:.2f}"))
    expect(page.locator("figure[data-chart=size] svg")).to_be_visible()
    expect(page.locator("figure[data-chart=layer-losses] svg")).to_have_attribute("data-layers", "2")
    circles = page.locator("figure[data-chart=layer-losses] circle").count()
    assert circles == sum(len(v) for v in mt["layer_losses"].values()) == 14

    # The artifact's files are listed with their sizes, and the links download them.
    (art,) = job["artifacts"]
    files = {f["path"]: f for f in stack.get(f"/v1/artifacts/{art['id']}/files").json()["items"]}
    links = page.locator("#artifacts table.files a")
    expect(links).to_have_count(len(files))
    link = page.get_by_role("link", name="config.json", exact=True)
    body = page.request.get(link.get_attribute("href")).body()
    assert len(body) == files["config.json"]["size"] and b'"quantization_config"' in body
    # How to load it: drawn live when the job finished (the page was first rendered with no artifact).
    how = page.locator(f"#load-{art['id']}")
    expect(how).to_have_count(1)
    how.locator("summary").click()
    expect(how.locator("summary")).to_have_text(f"How to load gptq (download the files into ./{art['id']} first)")
    expect(how.locator("pre")).to_have_count(2)
    expect(how.locator("pre").first).to_contain_text(f'AutoModelForCausalLM.from_pretrained("./{art["id"]}", device_map="auto")')
    expect(how.locator("pre").last).to_have_text(f'pip install vllm\nvllm serve "./{art["id"]}"')
    page.screenshot(path=shots / "03-finished-job.png", full_page=True, animations="disabled")


def test_a_bad_value_shows_its_error_next_to_the_field_and_keeps_the_form(page, stack, shots):
    jobs_before = job_count(stack)
    page.goto("/")
    choose(page, "f-model-source-s3")
    page.get_by_role("textbox", name="S3 URI").fill("https://bucket/prefix/")
    choose(page, "f-method-awq")
    page.locator("#f-options-awq-version").select_option("gemv")
    choose(page, "f-calibration-kind-texts")
    texts = "def f():\n    return 1\n\nclass A:\n    pass"
    page.get_by_role("textbox", name="Calibration texts").fill(texts)
    page.get_by_role("spinbutton", name="Samples").fill("0")
    page.get_by_text("Notify a webhook").click()
    page.get_by_role("textbox", name="Webhook URL").fill("https://ci.example/hooks/qf")
    page.get_by_label("Signing secret").fill("whsec_c2VjcmV0")

    with page.expect_response(lambda r: r.request.method == "POST") as answer:
        page.get_by_role("button", name="Start quantization").click()
    assert answer.value.status == 422
    page.wait_for_load_state()

    uri = field_of(page, "f-model-uri")
    expect(uri.locator(".field-error")).to_have_text(re.compile("must be an s3://bucket/prefix URI"))
    expect(page.locator("#f-model-uri")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#f-model-uri")).to_have_attribute("aria-describedby", re.compile("err-model-uri"))
    expect(field_of(page, "f-calibration-num-samples").locator(".field-error")).to_have_text(re.compile("greater than or equal to 1"))
    expect(page.locator(".field-error")).to_have_count(2)
    # Everything typed is still there, and the same groups show.
    expect(page.locator("#f-model-uri")).to_have_value("https://bucket/prefix/")
    expect(page.locator("#f-model-source-s3")).to_be_checked()
    expect(page.locator("#f-method-awq")).to_be_checked()
    expect(page.locator("#f-options-awq")).to_be_visible()
    expect(page.locator("#f-options-gptq")).to_be_hidden()
    expect(page.locator("#f-options-awq-version")).to_have_value("gemv")
    expect(page.locator("#f-calibration-kind-texts")).to_be_checked()
    assert page.locator("#f-calibration-texts").input_value() == texts
    expect(page.locator("#f-calibration-num-samples")).to_have_value("0")
    expect(page.locator("#f-webhooks-0-url")).to_have_value("https://ci.example/hooks/qf")
    # The secret is not echoed back, and the page says so next to it.
    expect(page.locator("#f-webhooks-0-secret")).to_have_value("")
    expect(field_of(page, "f-webhooks-0-secret")).to_contain_text("this secret was cleared")
    # The summary takes the keyboard focus and its links lead to the fields.
    assert page.evaluate("document.activeElement.id") == "error-summary"
    page.locator("#error-summary").get_by_role("link", name="model.uri").click()
    assert page.evaluate("document.activeElement.id") == "f-model-uri"
    page.screenshot(path=shots / "02-form-errors.png", full_page=True, animations="disabled")
    assert job_count(stack) == jobs_before, "a refused form must not create a job"


def test_cancel_a_running_job_with_the_button(page, stack, deep_model, shots):
    body = {"model": {"source": "local", "path": str(deep_model)}, "method": "gptq",
            "calibration": {"num_samples": 32, "seq_len": 128}}
    job_id = stack.submit(body)
    page.goto(f"/jobs/{job_id}")
    cancel = page.get_by_role("button", name="Cancel job")
    expect(cancel).to_be_visible()
    expect(page.get_by_role("button", name="Retry from checkpoints")).to_be_hidden()
    # Wait, on the same page, until the worker reports a finished layer.
    # A function, not an expression string: Playwright evals expression strings, which the pages' CSP forbids.
    page.wait_for_function("() => Number(document.getElementById('progress').getAttribute('aria-valuenow')) > 0", timeout=LONG)
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Layer \d+ of 12"))
    expect(page.locator("figure[data-chart=layer-losses] svg")).to_be_visible()  # drawn from the progress events
    page.screenshot(path=shots / "02-running-job.png", full_page=True, animations="disabled")

    cancel.click()
    expect(page.locator("#job-badge")).to_have_text(re.compile("cancelled", re.I), timeout=LONG)
    job = stack.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["progress"]["layers_done"] < 12
    expect(page.locator("#progress-text")).to_have_text(f"Cancelled after layer {job['progress']['layers_done']} of 12.")
    expect(page.locator("#timeline")).to_contain_text("Cancel requested")
    expect(cancel).to_be_hidden()
    expect(page.get_by_role("button", name="Retry from checkpoints")).to_be_visible()


@pytest.fixture(scope="module")
def finished_pair(stack, small_model):
    """One failed job (its model path does not exist) and one succeeded job."""
    failed = stack.submit({"model": {"source": "local", "path": str(small_model.parent / "nonexistent-model")}, "method": "rtn"})
    ok = stack.submit({"model": {"source": "local", "path": str(small_model)}, "method": "rtn"})
    return stack.wait(failed), stack.wait(ok)


def test_jobs_list_filters_by_status_and_pages(page, stack, finished_pair):
    failed, ok = finished_pair
    assert (failed["status"], ok["status"]) == ("failed", "succeeded")
    page.goto("/jobs")
    expect(page.locator(f"tr[data-job-id={failed['id']}] .badge")).to_have_text(re.compile("failed", re.I))
    expect(page.locator(f"tr[data-job-id={ok['id']}]")).to_contain_text("rtn")

    page.get_by_role("navigation", name="Filter by status").get_by_role("link", name="failed", exact=True).click()
    page.wait_for_url(re.compile(r"status=failed"))
    statuses = page.locator("tr[data-job-id]").evaluate_all("rows => rows.map(r => r.dataset.status)")
    assert statuses and set(statuses) == {"failed"}
    expect(page.locator(f"tr[data-job-id={failed['id']}]")).to_be_visible()
    expect(page.locator(f"tr[data-job-id={ok['id']}]")).to_have_count(0)
    expect(page.get_by_role("link", name="failed", exact=True)).to_have_attribute("aria-current", "true")

    page.get_by_role("link", name="succeeded", exact=True).click()
    page.wait_for_url(re.compile(r"status=succeeded"))
    assert set(page.locator("tr[data-job-id]").evaluate_all("rows => rows.map(r => r.dataset.status)")) == {"succeeded"}
    expect(page.locator(f"tr[data-job-id={ok['id']}]")).to_be_visible()

    # Pages of one job each: "Older" follows the cursor to the next older job.
    newest = stack.get("/v1/jobs?limit=2").json()["items"]
    page.goto("/jobs?limit=1")
    assert page.locator("tr[data-job-id]").get_attribute("data-job-id") == newest[0]["id"]
    page.get_by_role("link", name="Older »").click()
    page.wait_for_url(re.compile(r"cursor="))
    assert page.locator("tr[data-job-id]").get_attribute("data-job-id") == newest[1]["id"]
    expect(page.get_by_role("link", name="« Newest")).to_be_visible()


def test_a_failed_job_shows_its_error_code_and_message(page, finished_pair):
    failed, _ = finished_pair
    page.goto(f"/jobs/{failed['id']}")
    box = page.locator("#job-error")
    expect(box).to_be_visible()
    expect(box.locator("#error-code")).to_have_text(failed["error"]["code"])
    assert failed["error"]["code"] == "model_not_found"
    expect(box.locator("#error-message")).to_have_text(failed["error"]["message"])
    expect(page.get_by_role("button", name="Retry from checkpoints")).to_be_visible()
    expect(page.get_by_role("button", name="Cancel job")).to_be_hidden()


def test_an_unknown_job_id_gets_a_404_page(page):
    resp = page.goto("/jobs/job_00000000000000000000000000")
    assert resp.status == 404
    expect(page.get_by_role("heading", level=1)).to_contain_text("job_00000000000000000000000000")
    expect(page.get_by_role("link", name="See all jobs")).to_be_visible()


def tab_to(page, selector: str, limit: int = 80) -> None:
    """Press Tab until the focused element matches ``selector``; fail if it is never reached."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate("s => document.activeElement.matches(s)", selector):
            return
    raise AssertionError(f"{selector} cannot be reached with Tab")


def test_the_form_works_with_the_keyboard_alone(page, stack, small_model):
    page.goto("/")
    tab_to(page, "#f-model-source-hub")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#f-model-source-local")).to_be_checked()
    tab_to(page, "#f-model-path")
    # The focused input shows a visible focus ring.
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"
    page.keyboard.type(str(small_model))
    tab_to(page, "input[name=method]:checked")
    for _ in range(METHODS.index("rtn") - METHODS.index("gptq")):
        page.keyboard.press("ArrowRight")
    expect(page.locator("#f-method-rtn")).to_be_checked()
    tab_to(page, "#f-calibration-seq-len")
    page.keyboard.press("Control+A")
    page.keyboard.type("64")
    tab_to(page, "button[type=submit]")
    page.keyboard.press("Enter")
    page.wait_for_url(JOB_URL)
    spec = stack.get(f"/v1/jobs/{JOB_URL.search(page.url).group(1)}").json()["spec"]
    assert spec["method"] == "rtn" and spec["model"] == {"source": "local", "path": str(small_model)}
    assert spec["calibration"]["seq_len"] == 64


def test_pages_fit_a_375px_screen(browser, stack, small_model, shots):
    job = stack.wait(stack.submit({
        "model": {"source": "local", "path": str(small_model)}, "method": "gptq", "evaluate": True,
        "calibration": {"num_samples": 16, "seq_len": 64},
    }))
    assert job["status"] == "succeeded", job["error"]
    ctx = browser.new_context(base_url=stack.url, viewport={"width": 375, "height": 800})
    page = ctx.new_page()
    try:
        for path in ("/", "/jobs", f"/jobs/{job['id']}"):
            page.goto(path)
            if path.startswith("/jobs/"):
                expect(page.locator("figure[data-chart=layer-losses] svg")).to_be_visible()
                # The plot's numbers are the API's: layer 0 of the first legend entry.
                name = page.locator("figure[data-chart=layer-losses] .legend li").first.inner_text().strip()
                value = job["metrics"]["layer_losses"]["0"][name]
                page.get_by_text("Show the numbers").click()
                first = page.locator("figure[data-chart=layer-losses] tbody tr").first
                expect(first.locator("td").first).to_have_text(page.evaluate("v => v.toPrecision(4)", value))
                page.screenshot(path=shots / "04-finished-gptq-375px.png", full_page=True, animations="disabled")
            assert page.evaluate("document.documentElement.scrollWidth") <= 375, f"{path} scrolls sideways"
        # The form with errors shown must fit too.
        page.goto("/")
        choose(page, "f-model-source-local")
        page.get_by_role("button", name="Start quantization").click()
        expect(field_of(page, "f-model-path").locator(".field-error")).to_have_text(re.compile("field required"))
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
    finally:
        ctx.close()
