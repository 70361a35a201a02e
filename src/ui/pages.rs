//! The pages of `warren ui`, rendered from what the broker holds. Pure functions of their data:
//! maud escapes every string it interpolates, so a task's output (which may hold `<script>`)
//! shows as text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use maud::{DOCTYPE, Markup, PreEscaped, html};
use warren_broker::depth::QueueDepth;
use warren_broker::protocol::{AttemptNext, AttemptRecord, TaskStatus};
use warren_submitter::batches::BatchInfo;
use warren_submitter::pipeline::plan::{ItemState, StageCounts};
use warren_submitter::pipeline::run::RunState;
use warren_submitter::status::QueueStatus;

/// Lines of stderr shown per item in tables.
const TABLE_STDERR_LINES: usize = 3;

const STYLE: &str = r#"
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#243447;color:#fff;padding:.6em 1.2em;display:flex;gap:1.5em;align-items:baseline}
header a{color:#cde;text-decoration:none}header strong{font-size:1.2em}
main{padding:1em 1.5em}
table{border-collapse:collapse;margin:.5em 0 1.5em;background:#fff}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top;font-size:.92em}
th{background:#eef}
td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#111;color:#eee;padding:.6em;overflow-x:auto;max-height:40em;white-space:pre-wrap;word-break:break-all}
pre.tail{max-height:6em;margin:0;font-size:.85em}
.succeeded,.done,.up_to_date{color:#196127}.failed,.timed_out,.rejected{color:#b00020}
.skipped,.cancelled{color:#8a6d00}.submitted,.running{color:#0b5cad}
.note{color:#666;font-size:.9em}
form.filter{margin:.5em 0}
svg text{font-family:system-ui,sans-serif;font-size:12px}
"#;

/// The frame around every page; `refresh` reloads it every N seconds (a live run).
pub fn layout(title: &str, refresh: Option<u32>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                @if let Some(seconds) = refresh {
                    meta http-equiv="refresh" content=(seconds);
                }
                title { (title) " · warren" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    strong { "warren" }
                    a href="/" { "runs" }
                    a href="/batches" { "batches" }
                    a href="/queues" { "queues" }
                    span.note { "read-only" @if refresh.is_some() { " · refreshing every " (refresh.unwrap_or(0)) " s" } }
                }
                main { (body) }
            }
        }
    }
}

/// A run as listed on the front page.
pub struct RunRow {
    /// The run id.
    pub run: String,
    /// Its state, when it could be read.
    pub state: Option<RunState>,
    /// Seconds since it started (from its id).
    pub age_s: Option<u64>,
}

/// The front page: every run the broker holds, newest first.
pub fn runs(rows: &[RunRow], problem: Option<&str>) -> Markup {
    html! {
        h1 { "Runs" }
        @if let Some(p) = problem { p.failed { (p) } }
        @if rows.is_empty() {
            p.note { "No run is recorded (runs are kept for --result-expiry-hours after they were last used)." }
        } @else {
            table {
                tr { th { "run" } th { "state" } th { "done" } th { "failed" } th { "skipped" } th { "running" } th { "queued" } th { "waiting" } th { "started" } }
                @for row in rows {
                    @let totals = row.state.as_ref().map(totals);
                    tr {
                        td { a href={ "/runs/" (row.run) } { (row.run) } }
                        td {
                            @match &row.state {
                                Some(s) if s.complete => span.done { "complete" },
                                Some(_) => span.running { "in progress" },
                                None => span.note { "state not readable" },
                            }
                        }
                        @if let Some(t) = totals {
                            td.n { (t.done + t.up_to_date) } td.n.failed { (t.failed) } td.n { (t.skipped) } td.n { (t.running.saturating_sub(t.queued)) } td.n { (t.queued) } td.n { (t.waiting) }
                        } @else {
                            td {} td {} td {} td {} td {} td {}
                        }
                        td { (ago(row.age_s)) }
                    }
                }
            }
        }
    }
}

fn totals(state: &RunState) -> StageCounts {
    let mut all = StageCounts::default();
    for (_, c) in &state.counts {
        all.done += c.done;
        all.up_to_date += c.up_to_date;
        all.failed += c.failed;
        all.skipped += c.skipped;
        all.running += c.running;
        all.queued += c.queued;
        all.waiting += c.waiting;
    }
    all
}

fn ago(seconds: Option<u64>) -> String {
    match seconds {
        Some(s) => format!(
            "{} ago",
            humantime::format_duration(Duration::from_secs(s.max(1)))
                .to_string()
                .split(' ')
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        ),
        None => "?".into(),
    }
}

/// Which items the run page lists.
#[derive(Debug, Default, serde::Deserialize)]
pub struct ItemFilter {
    /// Only this stage.
    pub stage: Option<String>,
    /// Only items in this state (`failed`, `done`, `submitted`, ...).
    pub state: Option<String>,
    /// Only items whose path contains this.
    pub q: Option<String>,
}

/// The name of an item's state, as the pages and filters use it.
pub fn state_name(state: &ItemState) -> &'static str {
    match state {
        ItemState::Waiting => "waiting",
        ItemState::Submitted => "submitted",
        ItemState::Done => "done",
        ItemState::UpToDate => "up_to_date",
        ItemState::Failed(_) => "failed",
        ItemState::Skipped => "skipped",
    }
}

/// A run's page: stage counts, the stage graph, a timeline of its attempts, and its items.
// Long: a page template (maud markup) whose sections are already helper functions; what remains is
// the page's layout.
pub fn run(state: &RunState, records: &[AttemptRecord], filter: &ItemFilter) -> Markup {
    let last: BTreeMap<(String, String), &AttemptRecord> = records
        .iter()
        .filter_map(|r| {
            Some((
                (
                    r.labels.get("stage")?.clone(),
                    r.labels.get("item")?.clone(),
                ),
                r,
            ))
        })
        .collect();
    let run_id = &state.run;
    html! {
        h1 { "Run " (run_id) }
        p {
            @if state.complete { span.done { "complete" } } @else { span.running { "in progress" } }
            " · workdir " code { (state.workdir) }
            " · " a href={ "/runs/" (run_id) "/logs" } { "every attempt" }
        }
        h2 { "Stages" }
        table id="stages" {
            tr { th { "stage" } th { "done" } th { "up to date" } th { "failed" } th { "skipped" } th { "running" } th { "queued" } th { "waiting" } }
            @for (name, c) in &state.counts {
                tr data-stage=(name) {
                    td { a href={ "/runs/" (run_id) "?stage=" (urlencode(name)) } { (name) } }
                    td.n.done { (c.done) } td.n { (c.up_to_date) } td.n.failed { (c.failed) } td.n { (c.skipped) }
                    td.n.running { (c.running.saturating_sub(c.queued)) } td.n { (c.queued) } td.n { (c.waiting) }
                }
            }
        }
        (graph(state))
        h2 { "Timeline" }
        (timeline(records))
        h2 { "Items" }
        form.filter method="get" {
            "stage " select name="stage" {
                option value="" { "any" }
                @for (name, _) in &state.counts {
                    option value=(name) selected[filter.stage.as_deref() == Some(name)] { (name) }
                }
            }
            " state " select name="state" {
                option value="" { "any" }
                @for s in ["failed", "submitted", "done", "up_to_date", "skipped"] {
                    option value=(s) selected[filter.state.as_deref() == Some(s)] { (s) }
                }
            }
            " path contains " input name="q" value=(filter.q.clone().unwrap_or_default());
            " " button { "filter" }
        }
        table id="items" {
            tr { th { "stage" } th { "item" } th { "state" } th { "attempts" } th { "worker" } th { "took" } th { "stderr (end)" } }
            @for (stage, items) in ordered_stages(state) {
                @for (item, item_state) in items {
                    @if shown(filter, stage, item, item_state) {
                        @let record = last.get(&(stage.to_string(), item.clone()));
                        tr {
                            td { (stage) }
                            td { a href=(item_link(run_id, stage, item)) { (item) } }
                            td class=(state_name(item_state)) {
                                (state_name(item_state))
                                @if let ItemState::Failed(kind) = item_state { " (" (kind) ")" }
                            }
                            td.n { (record.map_or(0, |r| r.attempt)) }
                            td { (record.map_or("", |r| r.worker.as_str())) }
                            td.n { (record.map_or(String::new(), |r| format!("{:.1}s", r.duration_s))) }
                            td {
                                @if let Some(tail) = record.and_then(|r| stderr_tail(r, TABLE_STDERR_LINES)) {
                                    pre.tail { (tail) }
                                }
                            }
                        }
                    }
                }
            }
        }
        p.note { "Items still waiting for their inputs, and skipped ones, are not listed; the stage table counts them." }
    }
}

fn ordered_stages(state: &RunState) -> Vec<(&str, &BTreeMap<String, ItemState>)> {
    state
        .counts
        .iter()
        .filter_map(|(name, _)| Some((name.as_str(), state.stages.get(name)?)))
        .collect()
}

fn shown(filter: &ItemFilter, stage: &str, item: &str, state: &ItemState) -> bool {
    let wanted = |f: &Option<String>, v: &str| f.as_deref().is_none_or(|w| w.is_empty() || w == v);
    wanted(&filter.stage, stage)
        && wanted(&filter.state, state_name(state))
        && filter
            .q
            .as_deref()
            .is_none_or(|q| q.is_empty() || item.contains(q))
}

/// The link to an item's page.
pub fn item_link(run: &str, stage: &str, item: &str) -> String {
    format!(
        "/runs/{run}/item?stage={}&item={}",
        urlencode(stage),
        urlencode(item)
    )
}

fn urlencode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~/".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

fn stderr_tail(record: &AttemptRecord, lines: usize) -> Option<String> {
    let stderr = record.output["stderr"]
        .as_str()
        .filter(|s| !s.trim().is_empty());
    let text = match stderr {
        Some(s) => {
            let all: Vec<&str> = s.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        None => record.error.as_ref()?.message.clone(),
    };
    Some(text)
}

/// The stages as boxes left to right, with an arrow per edge: solid for `each` (item by item),
/// dashed for `needs` (all first).
fn graph(state: &RunState) -> Markup {
    let names: Vec<&str> = state.counts.iter().map(|(n, _)| n.as_str()).collect();
    let (width, height, gap) = (200.0, 44.0, 60.0);
    let x = |i: usize| 10.0 + i as f64 * (width + gap);
    let position: BTreeMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let total_width = x(names.len()) + 10.0;
    html! {
        h2 { "Graph" }
        svg id="graph" width=(total_width) height="120" xmlns="http://www.w3.org/2000/svg" {
            defs {
                marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse" {
                    path d="M 0 0 L 10 5 L 0 10 z" fill="#555" {}
                }
            }
            @for edge in &state.edges {
                @if let (Some(from), Some(to)) = (position.get(edge.from.as_str()), position.get(edge.to.as_str())) {
                    @let (x1, x2) = (x(*from) + width, x(*to));
                    @if to > from && to - from == 1 {
                        line x1=(x1) y1="50" x2=(x2) y2="50" stroke="#555" stroke-width="1.5"
                            stroke-dasharray=(if edge.kind == "needs" { "5,4" } else { "none" }) marker-end="url(#arrow)" {}
                    } @else {
                        path d=(format!("M {} 28 C {} 0, {} 0, {} 28", x(*from) + width / 2.0, x(*from) + width / 2.0, x(*to) + width / 2.0, x(*to) + width / 2.0))
                            fill="none" stroke="#555" stroke-width="1.5"
                            stroke-dasharray=(if edge.kind == "needs" { "5,4" } else { "none" }) marker-end="url(#arrow)" {}
                    }
                }
            }
            @for (i, (name, c)) in state.counts.iter().enumerate() {
                rect x=(x(i)) y="28" width=(width) height=(height) rx="6" fill="#fff" stroke=(if c.failed > 0 { "#b00020" } else { "#243447" }) {}
                text x=(x(i) + 8.0) y="46" { (name) }
                text x=(x(i) + 8.0) y="63" fill="#555" { (c.done + c.up_to_date) " done · " (c.failed) " failed · " (c.running.saturating_sub(c.queued)) " running · " (c.queued) " queued" }
            }
            text x="10" y="110" fill="#777" { "solid: item by item (each) · dashed: after all of it (needs)" }
        }
    }
}

/// A row per task slot of each worker (attempts that overlap go to separate rows), a bar per
/// attempt from its start to its end: barrier tails and idle slots show as gaps.
fn timeline(records: &[AttemptRecord]) -> Markup {
    let mut spans: Vec<(&AttemptRecord, SystemTime, SystemTime)> = records
        .iter()
        .filter_map(|r| {
            let start = humantime::parse_rfc3339_weak(&r.started_at).ok()?;
            let end = humantime::parse_rfc3339_weak(&r.finished_at).ok()?;
            Some((r, start, end.max(start)))
        })
        .collect();
    spans.sort_by_key(|s| (s.0.worker.clone(), s.1));
    let (Some(first), Some(last)) = (
        spans.iter().map(|s| s.1).min(),
        spans.iter().map(|s| s.2).max(),
    ) else {
        return html! { p.note { "No attempt has been recorded yet." } };
    };
    // Each attempt takes the first row of its worker that is free when it starts.
    let mut rows: Vec<(String, SystemTime)> = Vec::new();
    let mut placed = Vec::with_capacity(spans.len());
    for (record, start, end) in &spans {
        let free = rows
            .iter()
            .position(|(worker, busy_until)| *worker == record.worker && *busy_until <= *start);
        let row = match free {
            Some(row) => row,
            None => {
                rows.push((record.worker.clone(), *end));
                rows.len() - 1
            }
        };
        rows[row].1 = *end;
        placed.push((row, *record, *start, *end));
    }
    let span_s = last
        .duration_since(first)
        .unwrap_or_default()
        .as_secs_f64()
        .max(0.001);
    let (label_w, plot_w, row_h) = (190.0, 760.0, 16.0);
    let at = |t: SystemTime| {
        label_w + t.duration_since(first).unwrap_or_default().as_secs_f64() / span_s * plot_w
    };
    let height = rows.len() as f64 * row_h + 24.0;
    html! {
        svg id="timeline" width=(label_w + plot_w + 10.0) height=(height) xmlns="http://www.w3.org/2000/svg" {
            @for (i, (worker, _)) in rows.iter().enumerate() {
                @if i == 0 || rows[i - 1].0 != *worker {
                    text x="4" y=(i as f64 * row_h + 12.0) { (worker) }
                }
            }
            @for (row, record, start, end) in &placed {
                rect x=(at(*start)) y=(*row as f64 * row_h + 2.0) width=((at(*end) - at(*start)).max(1.5)) height=(row_h - 4.0)
                    fill=(match record.status { TaskStatus::Succeeded => "#3c8d50", TaskStatus::Cancelled => "#c9a100", _ => "#c0392b" }) {
                    title {
                        (record.labels.get("stage").map_or("", String::as_str)) " "
                        (record.labels.get("item").map_or(record.task_id.as_str(), String::as_str))
                        " · attempt " (record.attempt) " · " (record.status.as_str()) " · " (format!("{:.1}s", record.duration_s))
                    }
                }
            }
            text x=(label_w) y=(height - 4.0) fill="#777" { "0 s" }
            text x=(label_w + plot_w - 60.0) y=(height - 4.0) fill="#777" { (format!("{span_s:.1} s")) }
        }
    }
}

/// Every attempt of one item (or of a batch's task, or a whole run or batch), in full.
pub fn attempts(title: &str, records: &[AttemptRecord], refresh_note: bool) -> Markup {
    html! {
        h1 { (title) }
        @if records.is_empty() {
            p.note { "No attempt is recorded (records are kept 7 days by default)." }
        }
        @if refresh_note { p.note { "Attempts appear as workers finish them." } }
        @for record in records {
            section.attempt {
                h3 {
                    @if let (Some(stage), Some(item)) = (record.labels.get("stage"), record.labels.get("item")) {
                        (stage) " · " (item) " · "
                    }
                    "task " code { (record.task_id) } " · attempt " (record.attempt) " · "
                    span class=(record.status.as_str()) { (record.status.as_str()) }
                    @if record.next == AttemptNext::Retry { " (tried again)" }
                }
                table {
                    @if let Some(error) = &record.error { tr { th { "error" } td { (error.kind) ": " (error.message) } } }
                    @if let Some(argv) = record.args["argv"].as_array() {
                        tr { th { "command" } td { code { (shell_words(argv)) } } }
                    }
                    @if let Some(cwd) = record.args["cwd"].as_str() { tr { th { "cwd" } td { code { (cwd) } } } }
                    @if let Some(code) = record.output["exit_code"].as_i64() { tr { th { "exit" } td { (code) } } }
                    @if let Some(signal) = record.output["signal"].as_i64() { tr { th { "signal" } td { (signal) } } }
                    tr { th { "duration" } td { (format!("{:.2} s", record.duration_s)) } }
                    tr { th { "worker" } td { (record.worker) " on " (record.host) } }
                    tr { th { "started" } td { (record.started_at) } }
                    tr { th { "finished" } td { (record.finished_at) } }
                    @for earlier in &record.previous_errors { tr { th { "earlier attempt" } td { (earlier.kind) ": " (earlier.message) } } }
                    @if let Some(outputs) = record.output["outputs"].as_array().filter(|o| !o.is_empty()) {
                        tr { th { "outputs" } td { @for o in outputs { code { (o["path"].as_str().unwrap_or("?")) } " (" (o["size"]) " bytes) " } } }
                    }
                }
                @for stream in ["stderr", "stdout"] {
                    @if let Some(text) = record.output[stream].as_str().filter(|s| !s.is_empty()) {
                        h4 { (stream) }
                        pre class=(stream) { (text) }
                    }
                }
            }
        }
    }
}

/// An argv as one would type it in a shell.
fn shell_words(argv: &[serde_json::Value]) -> String {
    let words: Vec<&str> = argv.iter().filter_map(|a| a.as_str()).collect();
    shlex::try_join(words.iter().copied()).unwrap_or_else(|_| words.join(" "))
}

/// The batches the broker holds, as `warren batches`.
pub fn batches(rows: &[BatchInfo], problem: Option<&str>) -> Markup {
    html! {
        h1 { "Batches" }
        @if let Some(p) = problem { p.failed { (p) } }
        table {
            tr { th { "batch" } th { "queue" } th { "tasks" } th { "collected" } th { "waiting results" } th { "collecting" } th { "age" } }
            @for b in rows {
                tr {
                    td { a href={ "/batches/" (b.batch) } { (b.batch) } }
                    td { (b.queue.clone().unwrap_or_default()) }
                    td.n { (b.total.map_or("?".into(), |t| t.to_string())) }
                    td.n { (b.collected) } td.n { (b.waiting) }
                    td { @if b.collecting { "yes" } @else { "no" } }
                    td { (ago(b.age_s)) }
                }
            }
        }
    }
}

/// One task queue: depth, in flight, consumers, rates, busy workers, alarms and dead letters
/// by reason.
pub struct QueueView {
    /// The status, or why it could not be read.
    pub status: Result<QueueStatus, String>,
    /// Dead letters by (reason, batch), when the dead-letter queue could be read.
    pub dead: BTreeMap<(String, String), u64>,
}

/// The task queues, as `warren status` and `warren dlq list`.
pub fn queues(views: &[(String, QueueView)]) -> Markup {
    html! {
        h1 { "Task queues" }
        @for (name, view) in views {
            h2 { (name) }
            @match &view.status {
                Err(e) => p.failed { (e) },
                Ok(status) => {
                    @if !status.alarms.is_empty() { p.failed { "broker alarms: " (status.alarms.join(", ")) } }
                    table {
                        tr { th { "queue" } th { "ready" } th { "in flight" } th { "consumers" } th { "publish/s" } th { "ack/s" } }
                        (depth_row(&status.tasks))
                        (depth_row(&status.dead_letters))
                    }
                    @if let Some(why) = &status.management_unavailable { p.note { "management API: " (why) } }
                    @if !status.workers.is_empty() {
                        table { tr { th { "worker" } th { "running" } }
                            @for w in &status.workers { tr { td { (w.name) } td.n { (w.unacked) } } } }
                    }
                }
            }
            @if !view.dead.is_empty() {
                h3 { "Dead letters" }
                table { tr { th { "reason" } th { "batch" } th { "count" } }
                    @for ((reason, batch), n) in &view.dead { tr { td { (reason) } td { (batch) } td.n { (n) } } } }
            }
        }
        p.note { "Add queues with --queue; queues named in batches' manifests are shown too." }
    }
}

fn depth_row(d: &QueueDepth) -> Markup {
    let rate = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.1}"));
    html! {
        tr {
            td { (d.queue) } td.n { (d.ready) } td.n { (d.unacked.map_or("-".into(), |u| u.to_string())) }
            td.n { (d.consumers) } td.n { (rate(d.publish_rate)) } td.n { (rate(d.ack_rate)) }
        }
    }
}

#[cfg(test)]
mod tests;
