"""Drives the web console in headless Chromium (Playwright, Debian's /usr/bin/chromium).

Run by crates/refinery/tests/console.rs against a real `refinery serve`, which has deployed
`shop.toml` for account A and a project named by REFINERY_OTHER_PROJECT for account B.
Reads from the environment (keys never on a command line):
  REFINERY_URL, REFINERY_OPERATOR_KEY, REFINERY_KEY_A, REFINERY_KEY_B,
  REFINERY_ACCOUNT_A, REFINERY_OTHER_PROJECT, REFINERY_CHROMIUM (default /usr/bin/chromium),
  REFINERY_SCREENSHOTS (a directory: the main pages are saved there as PNG; optional).
Prints `CHECK <name>: ok` per check passed; exits 1 with `FAILED <name>: <why>` otherwise.
"""

import json
import os
import sys

from playwright.sync_api import sync_playwright, expect

URL = os.environ["REFINERY_URL"].rstrip("/")
OPERATOR = os.environ["REFINERY_OPERATOR_KEY"]
KEY_A = os.environ["REFINERY_KEY_A"]
KEY_B = os.environ["REFINERY_KEY_B"]
ACCOUNT_A = os.environ["REFINERY_ACCOUNT_A"]
OTHER_PROJECT = os.environ["REFINERY_OTHER_PROJECT"]
CHROMIUM = os.environ.get("REFINERY_CHROMIUM", "/usr/bin/chromium")
SHOTS = os.environ.get("REFINERY_SCREENSHOTS")
TIMEOUT_MS = 20_000

current = "start"
last_page = None


def check(name):
    global current
    print(f"CHECK {current}: ok", flush=True)
    current = name


def shot(page, name):
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=True)


def sign_in(page, key):
    page.goto(f"{URL}/console/")
    page.fill("#key", key)
    page.click("#signin button[type=submit]")


def sign_out(page):
    page.click("#signout")
    expect(page.locator("#signin")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0, "sign-out left something in sessionStorage"


EXPECTED_NODES = {
    ("place-order", "endpoint"),
    ("placed", "topic"),
    ("reply", "response"),
    ("validate", "block"),
    ("charge", "block"),
    ("refuse", "block"),
    ("pack", "block"),
    ("collect", "block"),
    ("oops", "block"),
    ("mail", "block"),
}
EXPECTED_EDGES = {
    ("place-order", "validate", "then"),
    ("validate", "charge", "if"),
    ("validate", "refuse", "else"),
    ("charge", "pack", "fan-out"),
    ("pack", "collect", "fan-in"),
    ("charge", "oops", "exception"),
    ("collect", "reply", "then"),
    ("collect", "placed", "then"),
    ("placed", "mail", "then"),
}


def assert_no_overlaps(page):
    boxes = page.eval_on_selector_all(
        "svg.graph g.node rect",
        "els => els.map(e => { const b = e.getBoundingClientRect(); return [b.x, b.y, b.width, b.height]; })",
    )
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            overlap = a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]
            assert not overlap, f"nodes overlap: {a} {b}"


def run(p):
    global current
    browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    global last_page
    last_page = page
    problems = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on(
        "console",
        lambda m: problems.append(f"console {m.type}: {m.text}")
        if m.type == "error" and "Content Security Policy" in m.text
        else None,
    )
    requests = []
    page.on("request", lambda r: requests.append(r.url))

    current = "a wrong key is refused"
    sign_in(page, "rfk_not-a-key-of-this-server")
    expect(page.locator("#signin .error-box")).to_contain_text("not recognised")
    assert page.evaluate("sessionStorage.length") == 0, "a refused key was kept"
    shot(page, "sign-in-refused")
    check("account A signs in and sees its projects")

    sign_in(page, KEY_A)
    row = page.locator("tr[data-project=shop]")
    expect(row).to_be_visible()
    expect(page.locator(f"tr[data-project='{OTHER_PROJECT}']")).to_have_count(0)
    expect(page.locator("#who")).to_contain_text(ACCOUNT_A)
    assert KEY_A not in page.url, "the key is in the URL"
    shot(page, "projects")
    check("the graph has the deployed service's nodes and edges")

    page.click("tr[data-project=shop] a")
    expect(page.locator("svg.graph")).to_be_visible()
    nodes = set(
        tuple(x)
        for x in page.eval_on_selector_all(
            "svg.graph g.node", "els => els.map(e => [e.dataset.name, e.dataset.kind])"
        )
    )
    edges = set(
        tuple(x)
        for x in page.eval_on_selector_all(
            "svg.graph g.edge",
            "els => els.map(e => [e.dataset.from, e.dataset.to, e.dataset.type])",
        )
    )
    assert nodes == EXPECTED_NODES, f"nodes: got {sorted(nodes)}, expected {sorted(EXPECTED_NODES)}"
    assert edges == EXPECTED_EDGES, f"edges: got {sorted(edges)}, expected {sorted(EXPECTED_EDGES)}"
    labels = page.eval_on_selector_all("svg.graph text.edge-label", "els => els.map(e => e.dataset.label)")
    assert "if output.total > 0" in labels, f"the if edge's label is missing: {labels}"
    for label in ("else", "fan-out", "fan-in", "exception"):
        assert label in labels, f"edge label {label} missing: {labels}"
    assert_no_overlaps(page)
    check("a node opens with the keyboard: settings, code, env masked")

    page.focus("svg.graph g.node[data-name=validate]")
    page.keyboard.press("Enter")
    panel = page.locator("#node-panel")
    expect(panel).to_contain_text("block validate")
    expect(panel).to_contain_text("API_TOKEN")
    expect(panel).to_contain_text('print("validating", order)')
    assert "s3cr3t-value-never-shown" not in page.content(), "an env value reached the page"
    shot(page, "graph")
    check("invalid JSON input is refused before sending")

    page.click(".tabs a[href$='/run']")
    page.fill("#input", '{total: 5')
    before = len(requests)
    page.click("#start-run")
    expect(page.locator("#input-error")).to_contain_text("not valid JSON")
    assert not any("/runs" in u for u in requests[before:]), "an invalid input was sent"
    check("a run starts and its steps light up until it completes")

    page.fill("#input", json.dumps({"total": 5, "items": ["a", "b"]}))
    shot(page, "run-form")
    page.click("#start-run")
    page.wait_for_url("**/#/run/*")
    expect(page.locator("#run-status")).to_have_attribute("data-status", "succeeded")
    for name in ("validate", "charge", "pack", "collect"):
        expect(page.locator(f"svg.graph g.node[data-name={name}]")).to_have_attribute("data-status", "succeeded")
    expect(page.locator("svg.graph g.node[data-name=refuse]")).to_have_attribute("data-status", "")
    expect(page.locator("#step-tree")).to_contain_text("pack")
    check("a step's input, output and logs")

    page.click("#step-tree button[data-step=collect]")
    step = page.locator("#step-panel")
    expect(step).to_contain_text("Step collect")
    expect(page.locator("#step-logs")).to_contain_text("collected 2")
    expect(step).to_contain_text('"packed": "a"')
    shot(page, "run")
    check("an invocation's execution and logs")

    page.goto(f"{URL}/console/#/p/shop/run")
    page.select_option("#start", "charge")
    page.fill("#input", json.dumps({"total": 1, "items": []}))
    page.click("#invoke")
    expect(page.locator("#execution")).to_contain_text("charging 1")
    check("usage shows the invocations just made")

    page.click("nav a[href='#/usage']")
    # Usage is recorded with the execution records, a moment after the answers: reload
    # until it shows (the page itself does not poll).
    wanted = {"shop/validate": "1", "shop/charge": "2"}
    for _ in range(40):
        counts = {
            block: page.locator(f"tr[data-block='{block}'] .requests").all_inner_texts()
            for block in wanted
        }
        if all(counts[b] == [n] for b, n in wanted.items()):
            break
        page.wait_for_timeout(250)
        page.reload()
        page.wait_for_selector("h1:has-text('Usage this month')")
    else:
        raise AssertionError(f"usage per block: got {counts}, expected {wanted}")
    # The chart over days: one bar for today, with every request of the table.
    today = page.locator("svg.usage-chart rect.day")
    expect(today).to_have_count(1)
    total = sum(int(n) for n in page.locator("tr[data-block] .requests").all_inner_texts())
    title = today.first.locator("title").text_content() or ""
    if f": {total} requests" not in title:
        raise AssertionError(f"the day's bar says {title!r}, expected {total} requests")
    shot(page, "usage")
    check("the graph is readable at phone width")

    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"{URL}/console/#/p/shop")
    expect(page.locator("svg.graph")).to_be_visible()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 400, f"the page scrolls sideways at phone width ({width}px)"
    shot(page, "graph-phone")
    page.set_viewport_size({"width": 1360, "height": 900})
    check("two deployments compared; a rollback")

    page.goto(f"{URL}/console/#/p/shop/deployments")
    page.select_option("#diff-from", "1")
    page.select_option("#diff-to", "2")
    page.click("form:has(#diff-from) button[type=submit]")
    expect(page.locator("#diff")).to_contain_text("refuse: code changed")
    expect(page.locator("#diff pre.diff")).to_contain_text('"refused": True')
    expect(page.locator("#diff pre.diff")).to_contain_text('"declined": True')
    shot(page, "deployments")
    page.once("dialog", lambda d: d.accept())
    page.click("button[data-rollback='1']")
    expect(page.locator("#flash")).to_contain_text("Deployment 1 is live")
    check("sign out clears everything; account B never sees A's projects; its 32-node graph")

    sign_out(page)
    expect(page.locator("tr[data-project=shop]")).to_have_count(0)
    sign_in(page, KEY_B)
    expect(page.locator(f"tr[data-project='{OTHER_PROJECT}']")).to_be_visible()
    expect(page.locator("tr[data-project=shop]")).to_have_count(0)
    page.click(f"tr[data-project='{OTHER_PROJECT}'] a")
    expect(page.locator("svg.graph")).to_be_visible()
    expect(page.locator("svg.graph g.node")).to_have_count(32)
    # 30 transitions of one source, and a merge drawn as one edge per source.
    expect(page.locator("svg.graph g.edge")).to_have_count(32)
    expect(page.locator("svg.graph g.edge[data-type=merge]")).to_have_count(2)
    assert_no_overlaps(page)
    shot(page, "graph-large")
    page.goto(f"{URL}/console/#/p/shop")
    expect(page.locator("main .error-box")).to_contain_text("Not found")
    expect(page.locator("svg.graph")).to_have_count(0)
    page.goto(f"{URL}/console/#/usage")
    expect(page.locator(".usage")).to_have_count(1)
    assert page.locator(".usage").get_attribute("data-account") != ACCOUNT_A, "B sees A's usage"
    assert "shop/validate" not in page.content(), "account B's usage page shows account A's blocks"
    # The browser's cache held nothing of A's for B: reload A's graph URL with B's key.
    page.reload()
    assert "s3cr3t" not in page.content() and "validating" not in page.content()
    sign_out(page)
    check("the operator changes a quota, creates and disables an account")

    sign_in(page, OPERATOR)
    expect(page.locator("#who")).to_contain_text("operator")
    row = page.locator(f"tr[data-account='{ACCOUNT_A}']")
    expect(row).to_be_visible()
    row.locator("button[data-action=quota]").click()
    page.fill("#quota-instances", "42")
    page.click("#quota-form button[type=submit]")
    expect(page.locator("#flash")).to_contain_text(f"Quota of {ACCOUNT_A} saved")
    expect(page.locator("#quota-form")).to_contain_text("in force: 42")
    shot(page, "operator-accounts")
    page.fill("#new-account", "initech")
    page.click("#create-account button[type=submit]")
    expect(page.locator("#created-key")).to_contain_text("rfk_")
    page.once("dialog", lambda d: d.accept())
    page.click("tr[data-account=initech] button.danger")
    expect(page.locator("tr[data-account=initech] .badge")).to_have_text("disabled")
    page.click("nav a[href='#/operator/instances']")
    expect(page.locator("h1")).to_contain_text("Live instances")
    shot(page, "operator-instances")
    check("a spending cap set by the operator: A's invocation is refused with 402, explained")

    page.click("nav a[href='#/operator/accounts']")
    page.locator(f"tr[data-account='{ACCOUNT_A}'] button[data-action=billing]").click()
    page.fill("#billing-spending_cap", "0")
    page.click("#billing-form button[type=submit]")
    expect(page.locator("#flash")).to_contain_text(f"Billing terms of {ACCOUNT_A} saved")
    sign_out(page)
    sign_in(page, KEY_A)
    expect(page.locator("tr[data-project=shop]")).to_be_visible()
    page.goto(f"{URL}/console/#/p/shop/run")
    page.fill("#input", json.dumps({"total": 1, "items": []}))
    page.click("#invoke")
    expect(page.locator("#run-result .error-box")).to_contain_text("Spending cap reached")
    shot(page, "refused-402")
    sign_out(page)
    check("refusals are explained from the API's error JSON")

    explained = page.evaluate(
        """async () => {
        const { ApiError } = await import("/console/api.js");
        return [
          new ApiError(429, {error: {code: "throttled", limit: "rate", retry_after_s: 3, message: "m"}}, "POST", "/x").explain(),
          new ApiError(402, {error: {code: "spending_cap_reached", message: "m"}}, "POST", "/x").explain(),
          new ApiError(403, {error: {code: "account_disabled", message: "m"}}, "GET", "/x").explain(),
        ];
      }"""
    )
    assert "Throttled (limit: rate)" in explained[0] and "3 s" in explained[0], explained[0]
    assert "Spending cap reached" in explained[1], explained[1]
    assert "disabled" in explained[2], explained[2]
    check("no CSP violations or script errors")

    assert not problems, "; ".join(problems)
    check("done")
    browser.close()


def run_bills(p):
    """After the month was closed: account A's bill, its lines, its CSV."""
    global current
    browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    context = browser.new_context(viewport={"width": 1360, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    global last_page
    last_page = page
    current = "a closed bill with its lines and its CSV"
    sign_in(page, KEY_A)
    expect(page.locator("tr[data-project=shop]")).to_be_visible()
    page.click("nav a[href='#/bills']")
    bill = page.locator(".bill")
    expect(bill).to_have_count(1)
    expect(bill).to_contain_text("closed")
    expect(bill.locator("tbody tr").first).to_be_visible()
    expect(bill).to_contain_text("requests")
    shot(page, "bills")
    with page.expect_download() as download:
        bill.locator("button").click()
    path = download.value.path()
    with open(path, encoding="utf-8") as f:
        csv = f.read()
    assert "period" in csv.splitlines()[0] and ACCOUNT_A in csv, f"the CSV: {csv[:500]}"
    check("done")
    browser.close()


def main():
    with sync_playwright() as p:
        try:
            if os.environ.get("REFINERY_CONSOLE_PHASE") == "bills":
                run_bills(p)
            else:
                run(p)
        except Exception as e:  # noqa: BLE001 - any failure is the test's failure, reported
            print(f"FAILED {current}: {type(e).__name__}: {e}", flush=True)
            if last_page is not None:
                try:
                    print(f"the page ({last_page.url}) showed:\n{last_page.inner_text('body')}", flush=True)
                except Exception:  # noqa: BLE001 - the page may be gone
                    pass
            sys.exit(1)


if __name__ == "__main__":
    main()
