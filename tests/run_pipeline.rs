//! End-to-end: `warren run` of pipeline files against the real broker and a real worker: per-item
//! chaining, the barrier stage, up-to-date skipping, failures, bad files, and resuming after the
//! runner is killed.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

const MINUTE: Duration = Duration::from_secs(60);

/// A folder with `raw/f1.txt`..`raw/f{n}.txt` and `p.toml` holding `pipeline`.
fn project(test: &str, n: usize, pipeline: &str) -> PathBuf {
    let dir = scratch(test);
    std::fs::create_dir_all(dir.join("raw")).unwrap();
    for i in 1..=n {
        std::fs::write(dir.join(format!("raw/f{i}.txt")), format!("data {i}\n")).unwrap();
    }
    std::fs::write(dir.join("p.toml"), pipeline).unwrap();
    dir
}

/// Three stages: upper-case each file, gzip each result as soon as it exists, list them all.
/// Every command appends `<stage> <item>` to runs.log, so a test can count what ran.
const THREE_STAGES: &str = r#"
[[stage]]
name = "up"
each = "raw/*.txt"
command = ["sh", "-c", "echo \"up $1\" >> runs.log; case \"$1\" in *FAIL*) echo \"ERROR 4: $1: not recognized as a supported file format\" >&2; exit 3;; esac; mkdir -p work && tr a-z A-Z < \"$1\" > \"$2\"", "sh", "{}", "work/{stem}.up"]
outputs = ["work/{stem}.up"]

[[stage]]
name = "gz"
each = "up.outputs"
command = ["sh", "-c", "echo \"gz $1\" >> runs.log; mkdir -p out && gzip -c \"$1\" > \"$2\"", "sh", "{}", "out/{name}.gz"]
outputs = ["out/{name}.gz"]

[[stage]]
name = "list"
needs = ["gz"]
command = ["sh", "-c", "echo \"list all\" >> runs.log; ls -1 \"$@\" > out/list.txt", "sh", "{gz.outputs}"]
outputs = ["out/list.txt"]
"#;

/// The arguments of `warren run` of the project's `p.toml` on `queue`, then `extra`.
fn run_args(dir: &Path, queue: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["run", "--queue", queue, "--create-queue"]
        .map(String::from)
        .into();
    args.push(dir.join("p.toml").display().to_string());
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

async fn warren_run(dir: &Path, queue: &str, extra: &[&str]) -> Finished {
    let args = run_args(dir, queue, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_warren(&args, None, MINUTE).await
}

fn runs(dir: &Path) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in std::fs::read_to_string(dir.join("runs.log"))
        .unwrap_or_default()
        .lines()
    {
        *counts.entry(line.to_string()).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_chains_per_file_runs_its_barrier_once_and_then_only_what_is_out_of_date() {
    let queue = unique_queue("run");
    let dir = project("run", 4, THREE_STAGES);
    let _worker = WorkerProcess::start(&queue, &dir, &["--allow-exec", "sh", "--concurrency", "4"]);
    let done = warren_run(&dir, &queue, &[]).await;
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    let run = done.stdout.lines().next().unwrap().to_string();
    assert_eq!(
        std::fs::read_to_string(dir.join("work/f2.up")).unwrap(),
        "DATA 2\n"
    );
    let listed = std::fs::read_to_string(dir.join("out/list.txt")).unwrap();
    assert_eq!(listed.lines().count(), 4, "{listed}");
    let counts = runs(&dir);
    assert_eq!(counts.len(), 9, "4 + 4 + 1 commands: {counts:?}");
    assert!(
        counts.values().all(|n| *n == 1),
        "each ran once: {counts:?}"
    );

    let status = run_warren(&["status", "--run", &run], None, MINUTE).await;
    assert_eq!(status.code, Some(0), "{}", status.stderr);
    assert!(
        status.stdout.contains("complete") && status.stdout.contains("gz"),
        "{}",
        status.stdout
    );
    let json = run_warren(&["status", "--run", &run, "--json"], None, MINUTE).await;
    let json: serde_json::Value = serde_json::from_str(&json.stdout).expect("status JSON");
    assert_eq!(json["complete"], true);
    assert_eq!(json["stages"][1]["stage"], "gz");
    assert_eq!(json["stages"][1]["done"], 4);

    // Everything is up to date: a second run runs nothing.
    let again = warren_run(&dir, &queue, &[]).await;
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    assert_eq!(runs(&dir).values().sum::<usize>(), 9, "{}", again.stderr);

    // One input changes: only its chain and the barrier would run, and do.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(dir.join("raw/f2.txt"), "new data\n").unwrap();
    let dry = warren_run(&dir, &queue, &["--dry-run"]).await;
    assert_eq!(dry.code, Some(0), "{}", dry.stderr);
    for line in [
        "up: 1 item(s)",
        "raw/f2.txt",
        "gz: 1 item(s)",
        "work/f2.up",
        "list: 1 item(s)",
    ] {
        assert!(dry.stdout.contains(line), "{line}: {}", dry.stdout);
    }
    let rerun = warren_run(&dir, &queue, &[]).await;
    assert_eq!(rerun.code, Some(0), "{}", rerun.stderr);
    let counts = runs(&dir);
    assert_eq!(counts["up raw/f2.txt"], 2);
    assert_eq!(counts["gz work/f2.up"], 2);
    assert_eq!(counts["list all"], 2);
    assert_eq!(counts["up raw/f1.txt"], 1, "{counts:?}");
    assert_eq!(
        std::fs::read_to_string(dir.join("work/f2.up")).unwrap(),
        "NEW DATA\n"
    );
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_item_skips_only_its_own_downstream() {
    let queue = unique_queue("runfail");
    let dir = project("runfail", 3, THREE_STAGES);
    std::fs::write(dir.join("raw/FAIL.txt"), "x\n").unwrap();
    let _worker = WorkerProcess::start(&queue, &dir, &["--allow-exec", "sh"]);
    let done = warren_run(&dir, &queue, &[]).await;
    assert_eq!(done.code, Some(1), "{}", done.stderr);
    for named in [
        "up: raw/FAIL.txt: failed (exit_status)",
        // Why, from the step's own stderr, where the user already looks.
        "| ERROR 4: raw/FAIL.txt: not recognized as a supported file format",
        "gz: work/FAIL.up: skipped",
        "list: (once): skipped",
    ] {
        assert!(done.stderr.contains(named), "{named}: {}", done.stderr);
    }
    for i in 1..=3 {
        assert!(
            dir.join(format!("out/f{i}.up.gz")).exists(),
            "the other files went on"
        );
    }
    assert!(!dir.join("out/list.txt").exists());

    // The summary names the command that shows the rest; it works from anywhere with only the
    // broker's URL (run_warren's working folder is not the project's), and shows the step's
    // command, exit and stderr.
    let run = done.stdout.lines().next().unwrap().to_string();
    let hint = format!("warren logs {run} --stage up --item raw/FAIL.txt");
    assert!(done.stderr.contains(&hint), "{hint}: {}", done.stderr);
    let logs = run_warren(
        &["logs", &run, "--stage", "up", "--item", "raw/FAIL.txt"],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(logs.code, Some(0), "{}", logs.stderr);
    for shown in [
        "up raw/FAIL.txt",
        "attempt 1",
        "failed (exit_status",
        "exit status 3",
        "$ sh -c",
        "ERROR 4: raw/FAIL.txt: not recognized as a supported file format",
    ] {
        assert!(logs.stdout.contains(shown), "{shown}: {}", logs.stdout);
    }
    assert_eq!(logs.stdout.matches("== ").count(), 1, "{}", logs.stdout);
    // --failed over the whole run: only that attempt; --json lines carry the documented fields.
    let failed = run_warren(&["logs", &run, "--failed", "--json"], None, MINUTE).await;
    let records: Vec<serde_json::Value> = failed
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record per line"))
        .collect();
    assert_eq!(records.len(), 1, "{}", failed.stdout);
    let record = &records[0];
    assert_eq!(record["labels"]["item"], "raw/FAIL.txt");
    assert_eq!(record["output"]["exit_code"], 3);
    assert_eq!(record["args"]["argv"][0], "sh");
    assert_eq!(record["next"], "result");
    assert!(
        record["sent_by"].is_string() && record["worker"].is_string(),
        "{record}"
    );
    let all = run_warren(&["logs", &run, "--json"], None, MINUTE).await;
    assert_eq!(all.stdout.lines().count(), 7, "4 up + 3 gz: {}", all.stdout);
    // `warren status --run` lists the failure with its stderr, later and from anywhere.
    let status = run_warren(&["status", "--run", &run], None, MINUTE).await;
    for shown in [
        "up: raw/FAIL.txt: exit_status",
        "| ERROR 4: raw/FAIL.txt: not recognized as a supported file format",
        "warren logs",
    ] {
        assert!(status.stdout.contains(shown), "{shown}: {}", status.stdout);
    }
    let json = run_warren(&["status", "--run", &run, "--json"], None, MINUTE).await;
    let json: serde_json::Value = serde_json::from_str(&json.stdout).expect("status JSON");
    assert_eq!(json["failed"][0]["item"], "raw/FAIL.txt", "{json}");
    assert!(
        json["failed"][0]["stderr_tail"]
            .as_str()
            .is_some_and(|t| t.contains("not recognized")),
        "{json}"
    );
    delete_queues(&queue).await;
}

#[tokio::test]
async fn bad_pipeline_files_are_named_and_nothing_is_submitted() {
    let queue = unique_queue("runbad");
    for (text, named) in [
        (
            THREE_STAGES.replace("up.outputs", "upp.outputs"),
            "line 10: stage 'gz', each: there is no stage 'upp'",
        ),
        (
            THREE_STAGES.replace("needs = [\"gz\"]", "needs = [\"gzz\"]"),
            "stage 'list', needs: there is no stage 'gzz'",
        ),
        (
            THREE_STAGES.replace("work/{stem}.up\"]\n", "work/{stme}.up\"]\n"),
            "line 5: stage 'up', command: 'work/{stme}.up': unknown placeholder {stme}",
        ),
        (
            THREE_STAGES.replace("name = \"gz\"", "nme = \"gz\""),
            "unknown field `nme`",
        ),
        (
            "[[stage]]\nname = \"a\"\n".to_string(),
            "missing field `command`",
        ),
    ] {
        let dir = project("runbad", 1, &text);
        let done = warren_run(&dir, &queue, &[]).await;
        assert_eq!(done.code, Some(2), "{}", done.stderr);
        assert!(done.stderr.contains(named), "{named}: {}", done.stderr);
        assert!(done.stdout.is_empty(), "no run id: {}", done.stdout);
    }
    let dir = project("runbad", 0, THREE_STAGES);
    let empty = warren_run(&dir, &queue, &[]).await;
    assert_eq!(empty.code, Some(2), "{}", empty.stderr);
    assert!(empty.stderr.contains("matches no file"), "{}", empty.stderr);
    assert_eq!(
        empty.stderr.matches("nothing was submitted").count(),
        1,
        "said once: {}",
        empty.stderr
    );
    assert!(
        empty.stdout.is_empty(),
        "no run id for a run that cannot start: {}",
        empty.stdout
    );
    assert!(
        !empty.stderr.contains("status: warren status --run"),
        "{}",
        empty.stderr
    );
    // A stage queue nobody declared (a typo) is refused before a run id is given out too.
    let dir = project("runbad", 1, THREE_STAGES);
    let typo = run_warren(
        &[
            "run",
            "--queue",
            &queue,
            dir.join("p.toml").to_str().unwrap(),
        ],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(typo.code, Some(2), "{}", typo.stderr);
    assert!(typo.stderr.contains("does not exist"), "{}", typo.stderr);
    assert!(typo.stdout.is_empty(), "no run id: {}", typo.stdout);
    let status = run_warren(&["status", "--queue", &queue], None, MINUTE).await;
    assert_eq!(
        status.code,
        Some(2),
        "the queue was never created: {}",
        status.stdout
    );
    let unknown = run_warren(&["status", "--run", "no-such-run"], None, MINUTE).await;
    assert_eq!(unknown.code, Some(2));
    assert!(unknown.stderr.contains("not found"), "{}", unknown.stderr);
}

/// Slow steps that log when they start and end, to see the order of steps across files.
const SLOW_TWO_STAGES: &str = r#"
[[stage]]
name = "one"
each = "raw/*.txt"
command = ["sh", "-c", "echo \"start one $1\" >> order.log; sleep 0.4; echo \"one $1\" >> runs.log; mkdir -p work && cp \"$1\" \"$2\"; echo \"end one $1\" >> order.log", "sh", "{}", "work/{name}"]
outputs = ["work/{name}"]

[[stage]]
name = "two"
each = "one.outputs"
command = ["sh", "-c", "echo \"start two $1\" >> order.log; sleep 0.4; echo \"two $1\" >> runs.log; mkdir -p out && cp \"$1\" \"$2\"; echo \"end two $1\" >> order.log", "sh", "{}", "out/{name}"]
outputs = ["out/{name}"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_two_of_the_first_file_starts_before_step_one_of_the_last_file_ends() {
    // With the default settings: 12 files, one worker of 4 slots.
    let queue = unique_queue("runchain");
    let dir = project("runchain", 12, SLOW_TWO_STAGES);
    let _worker = WorkerProcess::start(&queue, &dir, &["--allow-exec", "sh", "--concurrency", "4"]);
    let done = warren_run(&dir, &queue, &[]).await;
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    let order = std::fs::read_to_string(dir.join("order.log")).unwrap();
    let position = |line: &str| {
        order
            .lines()
            .position(|l| l == line)
            .unwrap_or_else(|| panic!("{line} not in {order}"))
    };
    assert!(
        // Items go in glob order: f1, f10, f11, f12, f2, ..., f9 is the last.
        position("start two work/f1.txt") < position("end one raw/f9.txt"),
        "{order}"
    );
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_killed_again_and_again_loses_nothing_and_reruns_no_recorded_task() {
    let queue = unique_queue("runkill");
    let dir = project("runkill", 8, SLOW_TWO_STAGES);
    let _worker = WorkerProcess::start(&queue, &dir, &["--allow-exec", "sh", "--concurrency", "2"]);
    let mut run: Option<String> = None;
    for kill_after in [2usize, 7, 11] {
        let mut args = run_args(&dir, &queue, &["--max-queued", "2"]);
        if let Some(id) = &run {
            args.extend(["--resume".to_string(), id.clone()]);
        }
        let mut runner = warren()
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if run.is_none() {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(runner.stdout.take().unwrap()).lines();
            run = lines.next_line().await.unwrap();
        }
        eventually(MINUTE, "the runner to get that far", || async {
            (runs(&dir).values().sum::<usize>() >= kill_after).then_some(())
        })
        .await;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(runner.id().unwrap() as i32),
            Signal::SIGKILL,
        )
        .unwrap();
        let _ = runner.wait().await;
        // What was running finishes meanwhile; its result waits in the broker for the next runner.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let run = run.expect("run id");
    let done = warren_run(&dir, &queue, &["--resume", &run]).await;
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    let counts = runs(&dir);
    assert_eq!(counts.len(), 16, "every step of every file ran: {counts:?}");
    assert!(
        counts.values().all(|n| *n == 1),
        "no step ran twice: {counts:?}"
    );
    for i in 1..=8 {
        assert!(dir.join(format!("out/f{i}.txt")).exists());
    }
    // The workers' records of the run survived the runner's deaths: each step once.
    let logs = run_warren(&["logs", &run, "--json"], None, MINUTE).await;
    assert_eq!(logs.code, Some(0), "{}", logs.stderr);
    let mut steps = BTreeMap::new();
    for line in logs.stdout.lines() {
        let record: serde_json::Value = serde_json::from_str(line).expect("JSON record");
        let key = format!("{} {}", record["labels"]["stage"], record["labels"]["item"]);
        *steps.entry(key).or_insert(0) += 1;
    }
    assert_eq!(steps.len(), 16, "a record of every step: {steps:?}");
    assert!(steps.values().all(|n| *n == 1), "none twice: {steps:?}");
    delete_queues(&queue).await;
}

/// One quick step per file, each appending `one <item>` to runs.log.
const ONE_QUICK_STAGE: &str = r#"
[[stage]]
name = "one"
each = "raw/*.txt"
command = ["sh", "-c", "echo \"one $1\" >> runs.log; mkdir -p out && cp \"$1\" \"$2\"", "sh", "{}", "out/{name}"]
outputs = ["out/{name}"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_whose_connection_drops_mid_submission_submits_again_what_was_not_confirmed() {
    let queue = unique_queue("runcut");
    let dir = project("runcut", 200, ONE_QUICK_STAGE);
    let _worker = WorkerProcess::start(&queue, &dir, &["--allow-exec", "sh", "--concurrency", "8"]);
    let proxy = common::proxy::Proxy::start("127.0.0.1:5672").await;
    // The runner sends its tasks without waiting for each confirm: cut its connection part-way
    // (about a third of the run's tasks), dropping what was on the wire.
    proxy.cut_after_upstream_bytes(40_000);
    let done = warren()
        .env("WARREN_AMQP_URL", proxy.url())
        .args(run_args(&dir, &queue, &[]))
        .output();
    let done = tokio::time::timeout(MINUTE, done)
        .await
        .expect("the run finishes within a minute")
        .unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("run interrupted"),
        "the cut happened mid-run: {stderr}"
    );
    let counts = runs(&dir);
    assert_eq!(
        counts.len(),
        200,
        "every item ran, also those whose task or confirm the cut lost: {counts:?}"
    );
    for i in 1..=200 {
        assert!(dir.join(format!("out/f{i}.txt")).exists(), "out/f{i}.txt");
    }
    delete_queues(&queue).await;
}

/// Output of a GDAL/OGR inspection program; it must be installed (tests/run installs gdal-bin).
fn inspect(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{program} must be installed (Debian's gdal-bin; tests/run installs it): {e}")
        });
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gdal_example_pipeline_runs_on_an_autoscaled_local_pool() {
    let queue = unique_queue("gdal");
    let dir = scratch("gdal");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/pipeline");
    let made = std::process::Command::new(example.join("make-data.sh"))
        .arg(&dir)
        .status()
        .expect("make-data.sh runs (it needs gdal_create from gdal-bin)");
    assert!(made.success());
    std::fs::copy(example.join("pipeline.toml"), dir.join("pipeline.toml")).unwrap();
    let warren_bin = env!("CARGO_BIN_EXE_warren");
    let mut pool = WorkerProcess::spawn(
        &[
            "autoscale",
            "--queue",
            &queue,
            "--backend",
            "local",
            "--poll",
            "0.5",
            "--max",
            "2",
            "--tasks-per-worker",
            "2",
            "--metrics-addr",
            "127.0.0.1:0",
            "--",
            warren_bin,
            "worker",
            "--queue",
            &queue,
            "--concurrency",
            "2",
            "--allow-exec",
            "gdalwarp",
            "--allow-exec",
            "gdal_translate",
            "--allow-exec",
            "gdalbuildvrt",
            "--allow-exec",
            "ogr2ogr",
        ],
        &dir,
        &[],
    );
    // The autoscaler declares the queue it serves: no --create-queue needed.
    eventually(MINUTE, "the autoscaler to declare its queue", || async {
        let status = run_warren(&["status", "--queue", &queue], None, MINUTE).await;
        (status.code == Some(0)).then_some(())
    })
    .await;
    let pipeline = dir.join("pipeline.toml");
    let done = run_warren(
        &["run", "--queue", &queue, pipeline.to_str().unwrap()],
        None,
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    for i in 1..=4 {
        let cog = dir.join(format!("cog/tile_{i}.3857.tif"));
        let info = inspect("gdalinfo", &[cog.to_str().unwrap()]);
        assert!(info.contains("LAYOUT=COG"), "{info}");
        assert!(info.contains("Pseudo-Mercator"), "{info}");
    }
    // Read from another folder (this test's), the mosaic still finds its four tiles.
    let mosaic = inspect("gdalinfo", &[dir.join("mosaic.vrt").to_str().unwrap()]);
    assert!(mosaic.contains("Driver: VRT"), "{mosaic}");
    assert!(mosaic.contains("Pseudo-Mercator"), "{mosaic}");
    assert_eq!(
        mosaic.matches("cog/tile_").count(),
        4,
        "gdalinfo lists every tile: {mosaic}"
    );
    let vrt = std::fs::read_to_string(dir.join("mosaic.vrt")).unwrap();
    assert_eq!(
        vrt.matches("<SourceFilename relativeToVRT=\"1\">").count(),
        4,
        "one source per tile, named relative to the mosaic: {vrt}"
    );
    let sites = inspect(
        "ogrinfo",
        &["-so", "-al", dir.join("out/sites.gpkg").to_str().unwrap()],
    );
    assert!(sites.contains("Feature Count: 3"), "{sites}");
    assert!(
        sites.contains("Pseudo-Mercator") || sites.contains("3857"),
        "{sites}"
    );
    pool.signal(Signal::SIGTERM);
    assert_eq!(pool.exit_code(MINUTE).await, Some(0));
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_a_run_with_exit_3_and_the_resume_command() {
    let queue = unique_queue("runint");
    let dir = project("runint", 6, SLOW_TWO_STAGES);
    let _worker = WorkerProcess::start(&queue, &dir, &["--allow-exec", "sh", "--concurrency", "2"]);
    let pipeline = dir.join("p.toml");
    let runner = WorkerProcess::spawn(
        &[
            "run",
            "--queue",
            &queue,
            "--create-queue",
            "--max-queued",
            "2",
            pipeline.to_str().unwrap(),
        ],
        &dir,
        &[],
    );
    let mut runner = runner;
    eventually(MINUTE, "a first step to finish", || async {
        (runs(&dir).values().sum::<usize>() >= 1).then_some(())
    })
    .await;
    runner.signal(Signal::SIGINT);
    assert_eq!(
        runner.exit_code(MINUTE).await,
        Some(3),
        "{}",
        runner.log_text()
    );
    let log = runner.log_text();
    assert!(log.contains("warren run --resume "), "{log}");
    let run = log
        .split("warren run --resume ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_string();
    let status = run_warren(&["status", "--run", &run], None, MINUTE).await;
    assert!(status.stdout.contains("not complete"), "{}", status.stdout);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let done = warren_run(&dir, &queue, &["--resume", &run]).await;
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    let counts = runs(&dir);
    assert_eq!(counts.len(), 12, "{counts:?}");
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_pre_seeded_by_another_user_is_not_adopted() {
    use lapin::options::{BasicGetOptions, BasicNackOptions, BasicPublishOptions};
    let mallory = rabbit_user("warren-test-mallory").await;
    let queue = unique_queue("preseed");
    let done_dir = project("preseed-done", 2, THREE_STAGES);
    let fresh_dir = project("preseed-fresh", 2, THREE_STAGES);
    let _worker = WorkerProcess::start(
        &queue,
        &done_dir,
        &[
            "--allow-exec",
            "sh",
            "--data-root",
            done_dir.to_str().unwrap(),
            "--data-root",
            fresh_dir.to_str().unwrap(),
        ],
    );
    // A finished run of the same pipeline file gives Mallory a state with every item done.
    let finished = warren_run(&done_dir, &queue, &[]).await;
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    let done_run = finished.stdout.lines().next().unwrap().to_string();
    let victim = format!("nightly-{}", uuid::Uuid::now_v7().simple());
    let connection = lapin::Connection::connect(&mallory, lapin::ConnectionProperties::default())
        .await
        .expect("mallory connects");
    let channel = connection.create_channel().await.unwrap();
    let message = channel
        .basic_get(
            format!("warren.runs.{done_run}").as_str().into(),
            BasicGetOptions::default(),
        )
        .await
        .unwrap()
        .expect("the finished run's state");
    let mut state: serde_json::Value = rmp_serde::from_slice(&message.delivery.data).unwrap();
    message
        .delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    // ...which she plants under the name tonight's run will use.
    state["run"] = victim.clone().into();
    state["workdir"] = fresh_dir.display().to_string().into();
    state["generation"] = 1_000.into();
    warren_broker::topology::declare_run_queue(
        &channel,
        &victim,
        warren_broker::topology::DEFAULT_RESULT_EXPIRY,
    )
    .await
    .expect("mallory declares the run's queue");
    channel.confirm_select(Default::default()).await.unwrap();
    channel
        .basic_publish(
            "".into(),
            format!("warren.runs.{victim}").as_str().into(),
            BasicPublishOptions::default(),
            &rmp_serde::to_vec_named(&state).unwrap(),
            lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_user_id("warren-test-mallory".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = connection.close(200, "bye".into()).await;
    // The real run does its work: nothing is skipped as "done".
    let ran = warren_run(&fresh_dir, &queue, &["--run", &victim]).await;
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    assert!(
        fresh_dir.join("out/list.txt").exists(),
        "the run did its work: {}",
        ran.stderr
    );
    assert_eq!(runs(&fresh_dir).len(), 5, "{:?}", runs(&fresh_dir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_with_a_changed_pipeline_is_refused_before_anything_is_declared() {
    let queue = unique_queue("resumechanged");
    let dir = project("resumechanged", 1, THREE_STAGES);
    let _worker = WorkerProcess::start(&queue, &dir, &["--allow-exec", "sh"]);
    let done = warren_run(&dir, &queue, &[]).await;
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    let run = done.stdout.lines().next().unwrap().to_string();
    // The finished run's results queue is gone; its state is kept for a resume.
    let results = format!("warren.results.{run}");
    let exists = |queue: String| async move {
        let (connection, channel) = raw_channel().await;
        let found = channel
            .queue_declare(
                queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .is_ok();
        let _ = connection.close(200, "bye".into()).await;
        found
    };
    assert!(
        !exists(results.clone()).await,
        "the results queue was deleted"
    );
    std::fs::write(
        dir.join("p.toml"),
        THREE_STAGES.replace("tr a-z A-Z", "tr a-z a-z"),
    )
    .unwrap();
    let refused = warren_run(&dir, &queue, &["--resume", &run]).await;
    assert_eq!(refused.code, Some(2), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("another version"),
        "{}",
        refused.stderr
    );
    assert!(refused.stdout.is_empty(), "no run id: {}", refused.stdout);
    assert!(
        !exists(results).await,
        "the refused resume declared the results queue again"
    );
}

/// A message in a run's results queue that is not one of its workers' answers (another batch's,
/// one without the run's token, or not a result at all) is not taken: it ends in the first
/// stage queue's dead-letter queue saying why, by the time the run is done (the runner
/// republishes it with confirms rather than leave the broker to dead-letter a rejection while
/// the results queue is deleted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_that_are_not_the_runs_are_dead_lettered_with_why() {
    let queue = unique_queue("run-forged");
    let dir = project("run-forged", 2, THREE_STAGES);
    let run = format!("forged-{}", uuid::Uuid::now_v7().simple());
    let (conn, channel) = raw_channel().await;
    warren_broker::topology::declare_result_queue(
        &channel,
        &run,
        &queue,
        warren_broker::topology::DEFAULT_RESULT_EXPIRY,
    )
    .await
    .unwrap();
    let forge = |batch: &str| {
        rmp_serde::to_vec_named(&serde_json::json!({
            "v": 1, "task_id": "up-0000000000000000", "batch": batch, "seq": 0, "kind": "exec",
            "status": "succeeded", "output": {}, "worker": "mallory", "attempt": 1,
            "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:00:00Z",
            "labels": {"stage": "up", "item": "raw/f1.txt"}
        }))
        .unwrap()
    };
    for body in [
        forge(&run),
        forge("another-batch"),
        b"not a result".to_vec(),
    ] {
        publish_raw(&channel, &format!("warren.results.{run}"), &body).await;
    }
    let _worker = WorkerProcess::start(&queue, &dir, &["--allow-exec", "sh"]);
    let finished = warren_run(&dir, &queue, &["--run", &run]).await;
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    assert_eq!(
        runs(&dir).get("up raw/f1.txt"),
        Some(&1),
        "the forged result did not stand in for the real step"
    );
    let dead = drain(&channel, &format!("{queue}.dead")).await;
    let _ = conn.close(200, "bye".into()).await;
    let mut why: Vec<(String, String)> = dead
        .iter()
        .map(|d| {
            (
                header(d, "x-warren-dead-reason").unwrap_or_default(),
                header(d, "x-warren-dead-detail").unwrap_or_default(),
            )
        })
        .collect();
    why.sort();
    assert_eq!(why.len(), 3, "{why:?}");
    assert_eq!(why[0].0, "foreign_result", "{why:?}");
    assert!(why[0].1.contains("token"), "{why:?}");
    assert_eq!(why[1].0, "foreign_result", "{why:?}");
    assert!(why[1].1.contains("another-batch"), "{why:?}");
    assert_eq!(why[2].0, "unreadable_result", "{why:?}");
    delete_queues(&queue).await;
}
