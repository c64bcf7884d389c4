"""End to end through a real ``dagster dev`` (issue 8).

1. In headless Chromium: the global asset lineage shows every asset of the code location, the chain job's
   "Materialize all" runs the whole pipeline to success, and the page of ``cluster_outcomes`` shows its
   Kaplan-Meier plot and its asset checks. Screenshots go to ``test-artifacts/e2e/``.
2. Through the Dagster GraphQL API (the dagster-graphql client), as a scheduler or another service would:
   a cohort's partition is added and ``cohort_discovery`` launched for it with run config; it writes its
   cohort table (one row per patient, the reference patient left out) and audit row.
3. In headless Chromium: the cohort's page shows the reference and its neighbours as pictures, inline (served
   by ``imaging-assets serve``, which the fixture runs beside the UI as ``make dev`` does), and the pages of
   ``cohort_outcomes``, ``phenotype_clusters``, ``lesion_thumbnails`` and ``cluster_outcomes`` their plots.

The tests share one server (session fixture ``dagster_dev``) but not an order: the GraphQL test reuses the
browser test's materialization when there is one and otherwise materializes everything itself.
"""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    # dagster-graphql's client calls gql with arguments gql deprecates; not ours to fix
    pytest.mark.filterwarnings("ignore:Using variable_values and operation_name:DeprecationWarning"),
]

LOCATION = "imaging_assets"
REPOSITORY = "__repository__"
CHAIN_JOB = "refresh_job"


def _asset_graph():
    from imaging_assets.definitions import defs

    d = defs() if callable(defs) and not isinstance(defs, dg.Definitions) else defs
    return d.get_repository_def().asset_graph


def _asset_names() -> list[str]:
    return sorted(k.to_user_string() for k in _asset_graph().get_all_asset_keys())


def _check_names(asset: str) -> list[str]:
    return sorted(c.name for c in _asset_graph().asset_check_keys if c.asset_key == dg.AssetKey(asset))


class Screens:
    """Numbered screenshots in the artefact folder."""

    def __init__(self, driver, folder: Path, first: int = 1) -> None:
        self.driver, self.folder, self.n, self.saved = driver, folder, first - 1, []

    def shot(self, name: str) -> Path:
        self.n += 1
        path = self.folder / f"{self.n:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        self.saved.append(path)
        return path


def _missing_from_graph(text: str, assets: list[str]) -> list[str]:
    """Assets whose node label is not on the page. Zoomed out, the graph shortens a long name in the middle
    (``embedding_robustness`` -> ``embedd…_robustness``): such a label counts for the asset it starts and ends."""
    labels = set(text.split())
    shortened = [tuple(label.split("…", 1)) for label in labels if "…" in label]
    return [a for a in assets if a not in text and not any(
        a.startswith(head) and a.endswith(tail) and len(head) + len(tail) < len(a) for head, tail in shortened)]


def _body_text(driver) -> str:
    """The page's text ("" while a navigation replaces the page: the old body is then stale)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return driver.find_element(By.TAG_NAME, "body").text
    except (StaleElementReferenceException, NoSuchElementException):
        return ""


def _dismiss_community_dialog(driver) -> None:
    """The first-visit "Join the Dagster community" dialog covers the page: skip it if it is there."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.XPATH, "//*[@role='dialog']//button[normalize-space()='Skip']"):
        if button.is_displayed():
            button.click()


def _expand_all_groups(driver, wait) -> None:
    """Groups start collapsed in the lineage graph: graph settings (cog, bottom right) -> Expand all groups."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    cogs = [b for b in driver.find_elements(By.XPATH, "//button[.//*[@aria-label='settings']]")
            if b.is_displayed() and not b.text.strip()]  # the navigation's "Settings" has a label
    assert cogs, "graph settings button not found on the lineage page"
    cogs[-1].click()
    item = wait.until(lambda d: next(
        (e for e in d.find_elements(By.XPATH, "//*[normalize-space(text())='Expand all groups' or "
                                              "normalize-space(text())='Collapse all groups']")
         if e.is_displayed()), False))
    if item.text.strip().startswith("Expand"):
        item.click()
    time.sleep(0.5)
    if any(e.is_displayed() for e in driver.find_elements(
            By.XPATH, "//*[normalize-space(text())='Collapse all groups']")):  # close the menu
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        time.sleep(0.5)


def _confirm_launch_dialog(driver) -> bool:
    """Where "Materialize all" opens a confirmation or launchpad dialog, press its launch button."""
    from selenium.webdriver.common.by import By

    for label in ("Launch run", "Materialize", "Materialize all", "Launch", "Confirm"):
        for b in driver.find_elements(By.XPATH, f"//*[@role='dialog']//button[normalize-space()='{label}']"):
            if b.is_displayed() and b.is_enabled():
                b.click()
                return True
    return False


def test_materialize_all_from_the_asset_graph(browser, dagster_dev, artifacts_dir):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, driver = dagster_dev, browser
    base = server.base_url
    wait = WebDriverWait(driver, 60, poll_frequency=0.5)
    screens = Screens(driver, artifacts_dir)
    assets = _asset_names()
    checks = _check_names("cluster_outcomes")
    assert len(assets) >= 11 and "cluster_outcomes" in assets
    assert "outcomes_coverage" in checks
    try:
        # Any same-origin page first, to mark the community dialog as seen (localStorage is per origin).
        driver.get(f"{base}/server_info")
        driver.execute_script("window.localStorage.setItem('communityNux', JSON.stringify('1'));")

        # 1. The global asset lineage shows every asset of the code location.
        driver.get(f"{base}/asset-groups")
        # "Materialize all…": the graph holds partitioned assets (the cohorts), so the global button asks first
        wait.until(lambda d: d.find_elements(By.XPATH, "//button[starts-with(normalize-space(), 'Materialize all')]"))
        _dismiss_community_dialog(driver)
        groups = sorted({_asset_graph().get(dg.AssetKey(a)).group_name for a in assets})
        wait.until(lambda d: all(g in _body_text(d) for g in groups))
        _expand_all_groups(driver, wait)
        try:
            wait.until(lambda d: not _missing_from_graph(_body_text(d), assets))
        finally:
            screens.shot("asset-graph")
        assert _missing_from_graph(_body_text(driver), assets) == []

        # 2. The chain job's "Materialize all" launches one run of every asset but the cohorts (partitions of
        # their own); wait for it through GraphQL.
        driver.get(f"{base}/locations/{LOCATION}/jobs/{CHAIN_JOB}")
        wait.until(lambda d: d.find_elements(By.XPATH, "//button[normalize-space()='Materialize all']"))
        _dismiss_community_dialog(driver)
        before = {r["runId"] for r in server.runs()}
        driver.find_element(By.XPATH, "//button[normalize-space()='Materialize all']").click()
        deadline = time.monotonic() + 60
        new: list[dict] = []
        while time.monotonic() < deadline:
            new = [r for r in server.runs(job_name=CHAIN_JOB) if r["runId"] not in before]
            if new:
                break
            _confirm_launch_dialog(driver)
            time.sleep(1)
        assert len(new) == 1, f"'Materialize all' should launch exactly one run, got {new}"
        run_id = new[0]["runId"]
        try:
            WebDriverWait(driver, 15).until(lambda d: "Launched run" in _body_text(d))
        except Exception:  # noqa: BLE001 - the toast is short-lived; the run id above is what counts
            pass
        screens.shot("materialize-all-launched")
        server.wait_for_run(run_id)
        server.materialized_run_id = run_id

        driver.get(f"{base}/runs/{run_id}")
        wait.until(lambda d: "Success" in _body_text(d))
        time.sleep(1)
        screens.shot("run-success")

        # 3. cluster_outcomes: the Kaplan-Meier plot in its metadata, its asset checks in the Checks tab.
        driver.get(f"{base}/assets/cluster_outcomes")
        wait.until(lambda d: d.find_elements(By.XPATH, "//tr[.//*[normalize-space(text())='kaplan_meier']]"))
        _dismiss_community_dialog(driver)
        screens.shot("cluster-outcomes-overview")

        def km_images(d):
            return _loaded_images(d, "Kaplan-Meier")

        try:  # served by imaging-assets serve: inline on the page
            imgs = WebDriverWait(driver, 30, poll_frequency=0.5).until(km_images)
        except TimeoutException:  # a picture carried in the metadata sits behind "[Show Markdown]"
            row = driver.find_element(By.XPATH, "//tr[.//*[normalize-space(text())='kaplan_meier']]")
            row.find_element(By.XPATH, ".//a[contains(normalize-space(.), 'Show Markdown')] | "
                                       ".//button[contains(normalize-space(.), 'Show Markdown')]").click()
            imgs = wait.until(km_images)
        assert imgs[0].get_attribute("src").startswith(server.pictures_url)
        assert imgs[0].size["width"] > 100 and imgs[0].size["height"] > 100, imgs[0].size
        screens.shot("cluster-outcomes-kaplan-meier")
        for b in driver.find_elements(By.XPATH, "//*[@role='dialog']//button[normalize-space()='Close']"):
            if b.is_displayed():
                b.click()

        driver.find_element(By.XPATH, "//a[normalize-space()='Checks']").click()
        wait.until(lambda d: "view=checks" in d.current_url and all(c in _body_text(d) for c in checks))
        wait.until(lambda d: "Evaluation result" in _body_text(d))
        text = _body_text(driver)
        assert f"Checks ({len(checks)})" in text, text[:2000]
        assert "Not evaluated" not in text
        screens.shot("cluster-outcomes-checks")
    except BaseException:
        try:
            screens.shot("failure")
            (artifacts_dir / "failure.html").write_text(driver.page_source)
            (artifacts_dir / "failure-console.txt").write_text("\n".join(map(str, driver.get_log("browser"))))
        except Exception:  # noqa: BLE001 - keep the original error
            pass
        raise


def _make_cohort(server, name: str, lesion_id: str, k: int = 3, tags: dict | None = None) -> str:
    """Add the cohort's partition and launch `cohort_discovery` for it through GraphQL; the run id."""
    added = server.graphql(
        """mutation Add($repo: RepositorySelector!, $defName: String!, $key: String!) {
             addDynamicPartition(repositorySelector: $repo, partitionsDefName: $defName, partitionKey: $key) {
               __typename ... on PythonError { message } ... on UnauthorizedError { message } } }""",
        {"repo": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY}, "defName": "cohorts",
         "key": name})["addDynamicPartition"]
    assert added["__typename"] in ("AddDynamicPartitionSuccess", "DuplicateDynamicPartitionError"), added
    return server.client().submit_job_execution(
        "cohort_discovery", repository_location_name=LOCATION, repository_name=REPOSITORY,
        run_config={"ops": {"cohort": {"config": {"reference_lesion_id": lesion_id, "k": k}}}},
        tags={"dagster/partition": name, **(tags or {})})


def _largest_lesion(server) -> tuple[str, str]:
    server.wait_until_idle()  # DuckDB: read only while no run writes
    return server.read_warehouse("SELECT lesion_id, patient_key FROM lesions WHERE extractable "
                                 "ORDER BY volume_mm3 DESC, lesion_id LIMIT 1")[0]


def test_cohort_discovery_through_graphql(dagster_dev, materialized_run):
    from dagster_graphql import DagsterGraphQLClientError

    server = dagster_dev
    client = server.client()
    lesion_id, patient = _largest_lesion(server)

    # Invalid run config is refused by the server before any run exists.
    with pytest.raises(DagsterGraphQLClientError) as bad:
        client.submit_job_execution(
            "cohort_discovery", repository_location_name=LOCATION, repository_name=REPOSITORY,
            run_config={"ops": {"cohort": {"config": {"k": "three"}}}}, tags={"dagster/partition": "gql"})
    assert "RunConfigValidationInvalid" in str(bad.value)

    run_id = _make_cohort(server, "gql", lesion_id, tags={"imaging_assets/trigger": "e2e-graphql"})
    server.wait_for_run(run_id)
    runs = {r["runId"]: r for r in server.runs(job_name="cohort_discovery")}
    assert runs[run_id]["status"] == "SUCCESS"

    server.wait_until_idle()
    rows = server.read_warehouse("SELECT rank, lesion_id, distance, patient_key, why FROM cohort_gql ORDER BY rank")
    assert [r[0] for r in rows] == [1, 2, 3]
    assert len({r[3] for r in rows}) == 3 and patient not in {r[3] for r in rows}  # one row per other patient
    assert all(r[2] is not None and r[2] >= 0 for r in rows)
    assert [r[2] for r in rows] == sorted(r[2] for r in rows)
    assert all(r[4] for r in rows)
    registry = server.read_warehouse("SELECT table_name, n_rows, audit_id FROM cohorts WHERE name = 'gql'")
    assert registry and registry[0][0] == "cohort_gql" and registry[0][1] == 3, registry
    audit = server.read_warehouse(
        "SELECT id, params, n_rows, status FROM audit_log WHERE action = 'cohort' ORDER BY logged_at")
    assert audit, "cohort_discovery wrote no 'cohort' row to audit_log"
    assert lesion_id in audit[-1][1] and audit[-1][2] == 3 and audit[-1][3] == "ok", audit[-1]
    assert registry[0][2] == audit[-1][0]


def _keep_failure(screens: Screens, driver, artifacts_dir: Path, shot: str, page: str) -> None:
    """A screenshot and the page source of a failing browser test (never hiding the original error)."""
    try:
        screens.shot(shot)
        (artifacts_dir / page).write_text(driver.page_source)
    except Exception:  # noqa: BLE001 - keep the original error
        pass


def _loaded_images(driver, alt_part: str) -> list:
    """Displayed images whose alt text holds ``alt_part`` and that have loaded (scrolled into view first:
    the UI may load images lazily)."""
    from selenium.webdriver.common.by import By

    found = []
    for i in driver.find_elements(By.CSS_SELECTOR, "img"):
        if alt_part not in (i.get_attribute("alt") or "") or not i.is_displayed():
            continue
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", i)
        if driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) > 0:
            found.append(i)
    return found


def test_cohort_pages_show_pictures(browser, dagster_dev, materialized_run, artifacts_dir):
    """A person opens the cohort's asset page and sees the reference and its neighbours as pictures (served
    by `imaging-assets serve`, inline, no click), the cohort's Kaplan-Meier curve against the rest, the
    columns of the cohort table, the reference picker of the clusters and the lesions' pictures."""
    from selenium.webdriver.support.ui import WebDriverWait

    server, driver = dagster_dev, browser
    base = server.base_url
    wait = WebDriverWait(driver, 90, poll_frequency=0.5)
    screens = Screens(driver, artifacts_dir, first=21)  # after the first browser test's screenshots
    if not server.read_warehouse("SELECT count(*) FROM information_schema.tables WHERE table_name = 'cohort_ui'")[0][0]:
        lesion_id, _ = _largest_lesion(server)
        server.wait_for_run(_make_cohort(server, "ui", lesion_id, k=4))
    try:
        driver.get(f"{base}/server_info")
        driver.execute_script("window.localStorage.setItem('communityNux', JSON.stringify('1'));")
        pages = [("cohort", "reference and neighbours", "cohort"), ("cohort_outcomes", "Kaplan-Meier", "cohort-km"),
                 ("phenotype_clusters", "largest lesion of each cluster", "reference-picker"),
                 ("lesion_thumbnails", "largest lesions", "lesion-pictures"),
                 ("cluster_outcomes", "Kaplan-Meier", "cluster-km")]
        for asset, alt, shot in pages:
            driver.get(f"{base}/assets/{asset}")
            wait.until(lambda d: "Metadata" in _body_text(d))
            _dismiss_community_dialog(driver)
            images = wait.until(lambda d, alt=alt: _loaded_images(d, alt))
            assert images[0].size["width"] >= 300, (asset, images[0].size)
            src = images[0].get_attribute("src")
            assert src.startswith(server.pictures_url), src  # a served file, shown without a click
            driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", images[0])
            time.sleep(0.5)
            screens.shot(shot)
        driver.get(f"{base}/assets/cohort")
        wait.until(lambda d: "Columns" in _body_text(d) and "explanation" in _body_text(d))
        screens.shot("cohort-columns")
    except BaseException:
        _keep_failure(screens, driver, artifacts_dir, "failure", "failure-cohort.html")
        raise


def test_search_page_with_tokens_and_a_saved_cohort(browser, dagster_dev, materialized_run, artifacts_dir):
    """A clinician signs in to `imaging-assets serve` with a token, searches the largest demo lesion, sees
    the neighbours' pictures, why each is close and how the neighbours did (Kaplan-Meier), saves the answer
    as a cohort, and finds it in the Dagster UI's catalog; no token gets 401, a viewer's SQL page 403."""
    import json
    import urllib.error
    import urllib.request

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from imaging_assets.access import add_user

    server, driver = dagster_dev, browser
    search = server.pictures_url.rsplit("/pictures", 1)[0]  # the server `make dev` runs beside the UI
    users = server.warehouse / "users.json"  # the server's default users file (read on every request)
    analyst = add_user("e2e.analyst", "analyst", path=users, replace=True)
    viewer = add_user("e2e.viewer", "viewer", path=users, replace=True)
    lesion_id, _ = _largest_lesion(server)
    wait = WebDriverWait(driver, 90, poll_frequency=0.5)
    screens = Screens(driver, artifacts_dir, first=31)
    try:
        with pytest.raises(urllib.error.HTTPError) as no_token:
            urllib.request.urlopen(f"{search}/api/similar/{lesion_id}", timeout=30)
        assert no_token.value.code == 401
        driver.delete_all_cookies()
        driver.get(f"{search}/?lesion_id={lesion_id}")
        wait.until(lambda d: "Access token" in _body_text(d))
        screens.shot("search-401-sign-in")

        driver.find_element(By.NAME, "token").send_keys(analyst)
        driver.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()
        wait.until(lambda d: "e2e.analyst (analyst)" in _body_text(d))
        box = driver.find_element(By.NAME, "lesion_id")
        box.clear()
        box.send_keys(lesion_id)
        driver.find_element(By.NAME, "k").send_keys("4")
        driver.find_element(By.CSS_SELECTOR, "form.search button").click()
        wait.until(lambda d: "closest patients" in _body_text(d))
        rows = driver.find_elements(By.CSS_SELECTOR, "tr.result")
        assert len(rows) == 4
        pictures = wait.until(lambda d: len(_loaded_images(d, "lesion ")) == 4 and _loaded_images(d, "lesion "))
        assert all(p.size["width"] >= 250 for p in pictures)
        assert _loaded_images(driver, "reference"), "the reference's picture did not load"
        why = rows[0].find_element(By.CSS_SELECTOR, "td.why").text
        assert "agree" in why and "differ" in why and "percentile" in why and "%" in why
        assert driver.find_elements(By.CSS_SELECTOR, "svg.km polyline"), "no Kaplan-Meier curve"
        screens.shot("search-results")

        driver.find_element(By.NAME, "name").send_keys("from_search")
        driver.find_element(By.CSS_SELECTOR, "form[action='/cohorts'] button").click()
        WebDriverWait(driver, 300, poll_frequency=1).until(lambda d: "saved" in _body_text(d) or "not saved" in
                                                           _body_text(d))
        assert "Cohort from_search saved" in _body_text(driver), _body_text(driver)[:2000]
        screens.shot("cohort-saved")
        server.wait_until_idle()
        registry = server.read_warehouse("SELECT \"user\", reference_lesion_id, n_rows FROM cohorts "
                                         "WHERE name = 'from_search'")
        assert registry and registry[0][:2] == ("e2e.analyst", lesion_id) and registry[0][2] >= 1, registry
        audited = server.read_warehouse("SELECT action, count(*) FROM audit_log WHERE \"user\" = 'e2e.analyst' "
                                        "GROUP BY 1 ORDER BY 1")
        assert dict(audited).get("cohort", 0) >= 1 and dict(audited).get("search", 0) >= 1, audited

        # the cohort is in the Dagster UI's catalog: the cohort asset's partition, materialized
        driver.get(f"{server.base_url}/server_info")
        driver.execute_script("window.localStorage.setItem('communityNux', JSON.stringify('1'));")
        driver.get(f"{server.base_url}/assets/cohort?view=partitions&partition=from_search")
        wait.until(lambda d: "from_search" in _body_text(d) and "Materialized" in _body_text(d))
        _dismiss_community_dialog(driver)
        screens.shot("catalog-cohort-from-search")

        # a viewer: no "save as cohort", and SQL is forbidden (403)
        driver.get(f"{search}/")
        driver.find_element(By.CSS_SELECTOR, "form[action='/logout'] button").click()
        wait.until(lambda d: "Access token" in _body_text(d))
        driver.find_element(By.NAME, "token").send_keys(viewer)
        driver.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()
        wait.until(lambda d: "e2e.viewer (viewer)" in _body_text(d))
        driver.get(f"{search}/?lesion_id={lesion_id}&k=2")
        wait.until(lambda d: "closest patients" in _body_text(d))
        assert "Save as cohort" not in _body_text(driver)
        driver.get(f"{search}/sql")
        wait.until(lambda d: "Not allowed" in _body_text(d))
        assert "may not run SQL queries" in _body_text(driver)
        screens.shot("search-403-viewer-sql")
        req = urllib.request.Request(f"{search}/api/cohorts", data=json.dumps({"name": "nope"}).encode(),
                                     headers={"Authorization": f"Bearer {viewer}", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as forbidden:
            urllib.request.urlopen(req, timeout=30)
        assert forbidden.value.code == 403
    except BaseException:
        _keep_failure(screens, driver, artifacts_dir, "failure-search", "failure-search.html")
        raise
