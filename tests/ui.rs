//! End-to-end: `warren ui` during and after a real run with a failing item, looked at in a real
//! browser (Debian's headless Chromium; tests/run installs it): the run page shows each stage's
//! counts, the failing item's page shows its stderr as text (a task's `<script>` never runs),
//! and a screenshot is kept under target/ui/ for people to look at.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const MINUTE: Duration = Duration::from_secs(60);

const PIPELINE: &str = r#"
[[stage]]
name = "check"
each = "raw/*.txt"
command = ["sh", "-c", "case \"$1\" in *bad*) echo 'gdalwarp: <script>alert(1)</script> not a GeoTIFF' >&2; exit 4;; *slow*) i=0; while [ ! -e release ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done;; esac; mkdir -p work && cp \"$1\" \"$2\"", "sh", "{}", "work/{stem}.ok"]
outputs = ["work/{stem}.ok"]

[[stage]]
name = "pack"
each = "check.outputs"
command = ["sh", "-c", "mkdir -p out && gzip -c \"$1\" > \"$2\"", "sh", "{}", "out/{name}.gz"]
outputs = ["out/{name}.gz"]
"#;

/// The DOM of `url` after Chromium loaded it (scripts, had there been any, ran).
fn chromium_dom(url: &str, profile: &Path) -> String {
    chromium(&["--dump-dom", url], profile)
}

fn chromium(args: &[&str], profile: &Path) -> String {
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("Debian's chromium must be installed (tests/run installs it): {e}")
        });
    assert!(
        out.status.success(),
        "chromium {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_and_its_failing_item_are_shown_in_a_real_browser() {
    let queue = unique_queue("ui");
    let dir = scratch("ui");
    std::fs::create_dir_all(dir.join("raw")).unwrap();
    for name in ["a", "b", "bad", "slow"] {
        std::fs::write(dir.join(format!("raw/{name}.txt")), format!("{name}\n")).unwrap();
    }
    std::fs::write(dir.join("p.toml"), PIPELINE).unwrap();
    let _worker = WorkerProcess::start(&queue, &dir, &["--allow-exec", "sh", "--concurrency", "4"]);
    let ui = WorkerProcess::spawn(
        &["ui", "--listen", "127.0.0.1:0", "--queue", &queue],
        &dir,
        &[],
    );
    ui.wait_for_log("warren ui on http://", 1, MINUTE).await;
    let log = ui.log_text();
    let base = log[log.find("http://").unwrap()..]
        .split_whitespace()
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_string();

    let pipeline = dir.join("p.toml");
    let mut runner = warren()
        .args([
            "run",
            "--queue",
            &queue,
            "--create-queue",
            pipeline.to_str().unwrap(),
        ])
        .current_dir(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let run = {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(runner.stdout.take().unwrap()).lines();
        lines.next_line().await.unwrap().expect("the run id")
    };
    let profile = dir.join("chromium");
    // The front page lists it.
    eventually(MINUTE, "the run on the front page", || async {
        chromium_dom(&format!("{base}/"), &profile)
            .contains(&format!("href=\"/runs/{run}\""))
            .then_some(())
    })
    .await;
    // While it runs (the slow item waits for the file `release`) the page says so and reloads
    // itself.
    let live = chromium_dom(&format!("{base}/runs/{run}"), &profile);
    std::fs::write(dir.join("release"), "").unwrap();
    assert!(
        live.contains("in progress") && live.contains("http-equiv=\"refresh\""),
        "{live}"
    );
    let status = tokio::time::timeout(MINUTE, runner.wait())
        .await
        .expect("the run ends")
        .unwrap();
    assert_eq!(status.code(), Some(1), "the run ends with a failed item");

    let page = eventually(MINUTE, "the finished run's page", || async {
        let dom = chromium_dom(&format!("{base}/runs/{run}"), &profile);
        dom.contains("complete").then_some(dom)
    })
    .await;
    // Stage counts, from the table rows the page marks with their stage.
    let row = |stage: &str| {
        let start = page
            .find(&format!("data-stage=\"{stage}\""))
            .unwrap_or_else(|| panic!("{page}"));
        let cells: Vec<String> = page[start..page[start..].find("</tr>").unwrap() + start]
            .split("<td")
            .skip(1)
            .map(|c| {
                let text = &c[c.find('>').unwrap() + 1..];
                text[..text.find("</td>").unwrap()].to_string()
            })
            .collect();
        cells
    };
    let check = row("check");
    assert_eq!(
        &check[1..5],
        ["3", "0", "1", "0"],
        "check: done, up to date, failed, skipped: {check:?}"
    );
    let pack = row("pack");
    assert_eq!(pack[1], "3", "pack done: {pack:?}");
    assert!(
        page.contains("id=\"graph\"") && page.contains("id=\"timeline\""),
        "{page}"
    );
    assert!(
        !page.contains("<script>alert"),
        "the task's script is never markup: {page}"
    );

    let item = format!("{base}/runs/{run}/item?stage=check&item=raw/bad.txt");
    let dom = chromium_dom(&item, &profile);
    assert!(
        dom.contains("gdalwarp: &lt;script&gt;alert(1)&lt;/script&gt; not a GeoTIFF"),
        "the stderr is shown, as text: {dom}"
    );
    assert!(!dom.contains("<script>"), "{dom}");
    assert!(
        dom.contains("exit_status") && dom.contains("attempt 1"),
        "{dom}"
    );

    let shots = screenshots();
    for (name, url) in [
        ("ui-run.png", format!("{base}/runs/{run}")),
        ("ui-item.png", item),
    ] {
        let file = shots.join(name);
        let _ = std::fs::remove_file(&file);
        chromium(
            &[
                &format!("--screenshot={}", file.display()),
                "--window-size=1280,1000",
                &url,
            ],
            &profile,
        );
        let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        assert!(
            size > 10_000,
            "a screenshot was kept at {}: {size} bytes",
            file.display()
        );
    }
    delete_queues(&queue).await;
}
