//! `warren ui`: a read-only web view of runs, batches, task queues and dead letters, served by
//! the `warren` binary itself. Each page is read from the broker when it is asked for (run
//! states, the logs stream, the management API); pages of a run in progress reload themselves.
//! It binds to loopback unless told otherwise, never shows a password or a batch token, and has
//! no buttons that change anything.

mod pages;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use clap::Args;
use maud::Markup;
use warren_broker::AmqpSettings;
use warren_broker::connection::close_connection;
use warren_broker::connection::connect;
use warren_broker::depth::{Management, ManagementTarget};
use warren_broker::protocol::AttemptRecord;
use warren_broker::topology::{DEFAULT_TASK_QUEUE, namespace};
use warren_submitter::batches::list_batches;
use warren_submitter::dlq::{DeadLetters, Filter};
use warren_submitter::logs::{LogFilter, Since, created_at, read_logs};
use warren_submitter::pipeline::state::{read_state, read_states};
use warren_submitter::status::queue_status;

use crate::cli::*;
use pages::{ItemFilter, QueueView, RunRow};

/// Seconds between reloads of a page whose run is in progress.
const REFRESH_S: u32 = 3;
/// Runs listed on the front page, newest first.
const MAX_RUNS: usize = 50;
/// Attempt records read for one page.
const MAX_RECORDS: usize = 20_000;

/// `warren ui`.
#[derive(Args)]
pub struct UiArgs {
    /// Address to serve on. The default is this machine only; another address shows your runs'
    /// commands and outputs to whoever reaches it (there is no login).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Task queues to show (more are found in batches' manifests).
    #[arg(long = "queue", default_value = DEFAULT_TASK_QUEUE)]
    queues: Vec<String>,
    /// Management API base URL (default: https://HOST:15671 for amqps://, http://HOST:15672 for amqp://).
    #[arg(long, env = "WARREN_MANAGEMENT_URL")]
    management_url: Option<String>,
}

struct Ui {
    amqp: AmqpSettings,
    management: ManagementTarget,
    queues: Vec<String>,
}

/// Serves the web view until Ctrl-C; returns the exit status.
pub async fn serve(args: UiArgs, amqp: AmqpSettings, insecure_http: bool) -> u8 {
    let ui = Arc::new(Ui {
        amqp,
        management: ManagementTarget {
            url: args.management_url,
            insecure_http,
        },
        queues: args.queues,
    });
    let app = Router::new()
        .route("/", get(runs_page))
        .route("/runs/{run}", get(run_page))
        .route("/runs/{run}/item", get(item_page))
        .route("/runs/{run}/logs", get(run_logs_page))
        .route("/batches", get(batches_page))
        .route("/batches/{batch}", get(batch_page))
        .route("/queues", get(queues_page))
        .with_state(ui);
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => return fail(&format!("cannot listen on {}: {e}", args.listen)),
    };
    let address = listener.local_addr().map_or(args.listen, |a| a);
    if !address.ip().is_loopback() {
        eprintln!(
            "warning: serving on {address}, not loopback: anyone who reaches it sees your runs' commands and output"
        );
    }
    eprintln!("warren ui on http://{address}/ (read-only; Ctrl-C stops it)");
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    match served {
        Ok(()) => EXIT_OK,
        Err(e) => fail(&format!("the web server stopped: {e}")),
    }
}

fn page(title: &str, refresh: Option<u32>, body: Markup) -> Response {
    Html(pages::layout(title, refresh, body).into_string()).into_response()
}

fn not_found(what: String) -> Response {
    let body = maud::html! { h1 { "Not found" } p { (what) } };
    (
        axum::http::StatusCode::NOT_FOUND,
        Html(pages::layout("not found", None, body).into_string()),
    )
        .into_response()
}

async fn runs_page(State(ui): State<Arc<Ui>>) -> Response {
    let listed = async {
        let api = Management::new(&ui.management, &ui.amqp)?;
        let prefix = format!("{}.runs.", namespace());
        api.queues(&prefix).await.map(|queues| {
            queues
                .into_iter()
                .map(|q| q.name[prefix.len()..].to_string())
                .collect::<Vec<_>>()
        })
    };
    let (mut ids, problem) = match listed.await {
        Ok(ids) => (ids, None),
        Err(e) => (Vec::new(), Some(format!("cannot list runs: {e}"))),
    };
    // Newest first: ids are time-ordered.
    ids.sort_by(|a, b| b.cmp(a));
    ids.truncate(MAX_RUNS);
    let now = SystemTime::now();
    let states = read_states(&ui.amqp, &ids)
        .await
        .unwrap_or_else(|_| vec![None; ids.len()]);
    let rows: Vec<RunRow> = ids
        .into_iter()
        .zip(states)
        .map(|(run, state)| RunRow {
            state,
            age_s: created_at(&run)
                .and_then(|at| now.duration_since(at).ok())
                .map(|d| d.as_secs()),
            run,
        })
        .collect();
    let live = rows
        .iter()
        .any(|r| r.state.as_ref().is_some_and(|s| !s.complete));
    page(
        "runs",
        live.then_some(REFRESH_S),
        pages::runs(&rows, problem.as_deref()),
    )
}

/// The attempt records of `batch` that `filter` keeps, up to [`MAX_RECORDS`].
async fn records(ui: &Ui, filter: LogFilter) -> Result<Vec<AttemptRecord>, String> {
    let connection = connect(&ui.amqp, &connection_name("ui"))
        .await
        .map_err(|e| e.to_string())?;
    let mut found = Vec::new();
    let read = read_logs(
        &connection,
        &filter,
        Since::BatchStart,
        false,
        &mut |entry| {
            if found.len() < MAX_RECORDS {
                found.push(entry.record);
            }
        },
    )
    .await;
    close_connection(&connection, "read").await;
    read.map_err(|e| e.to_string())?;
    Ok(found)
}

fn batch_filter(batch: &str) -> LogFilter {
    LogFilter {
        batch: batch.to_string(),
        ..LogFilter::default()
    }
}

async fn run_page(
    State(ui): State<Arc<Ui>>,
    Path(run): Path<String>,
    Query(filter): Query<ItemFilter>,
) -> Response {
    let state = match read_state(&ui.amqp, &run).await {
        Ok(Some(state)) => state,
        Ok(None) => {
            return not_found(format!(
                "run {run} has no recorded state (never started, or expired)"
            ));
        }
        Err(e) => {
            return page(
                "error",
                Some(REFRESH_S),
                maud::html! { p.failed { (e.to_string()) } },
            );
        }
    };
    let records = records(&ui, batch_filter(&run)).await.unwrap_or_default();
    page(
        &format!("run {run}"),
        (!state.complete).then_some(REFRESH_S),
        pages::run(&state, &records, &filter),
    )
}

#[derive(serde::Deserialize)]
struct ItemQuery {
    stage: String,
    item: String,
}

async fn item_page(
    State(ui): State<Arc<Ui>>,
    Path(run): Path<String>,
    Query(query): Query<ItemQuery>,
) -> Response {
    let filter = LogFilter {
        stage: Some(query.stage.clone()),
        item: Some(query.item.clone()),
        ..batch_filter(&run)
    };
    match records(&ui, filter).await {
        Ok(found) => page(
            &query.item,
            None,
            pages::attempts(&format!("{} · {}", query.stage, query.item), &found, false),
        ),
        Err(e) => page(
            "error",
            None,
            maud::html! { p.failed { "cannot read the logs: " (e) } },
        ),
    }
}

async fn run_logs_page(State(ui): State<Arc<Ui>>, Path(run): Path<String>) -> Response {
    attempts_page(&ui, &run, &format!("Every attempt of run {run}")).await
}

async fn batch_page(State(ui): State<Arc<Ui>>, Path(batch): Path<String>) -> Response {
    attempts_page(&ui, &batch, &format!("Every attempt of batch {batch}")).await
}

async fn attempts_page(ui: &Ui, id: &str, title: &str) -> Response {
    match records(ui, batch_filter(id)).await {
        Ok(found) => page(title, None, pages::attempts(title, &found, true)),
        Err(e) => page(
            "error",
            None,
            maud::html! { p.failed { "cannot read the logs: " (e) } },
        ),
    }
}

async fn batches_page(State(ui): State<Arc<Ui>>) -> Response {
    match list_batches(&ui.amqp, &ui.management).await {
        Ok(rows) => page("batches", Some(REFRESH_S * 2), pages::batches(&rows, None)),
        Err(e) => page(
            "batches",
            None,
            pages::batches(&[], Some(&format!("cannot list batches: {e}"))),
        ),
    }
}

async fn queues_page(State(ui): State<Arc<Ui>>) -> Response {
    let mut names: BTreeSet<String> = ui.queues.iter().cloned().collect();
    if let Ok(batches) = list_batches(&ui.amqp, &ui.management).await {
        names.extend(batches.into_iter().filter_map(|b| b.queue));
    }
    let mut views = Vec::new();
    for name in names {
        let status = queue_status(&ui.amqp, &ui.management, &name)
            .await
            .map_err(|e| e.to_string());
        let dead = match DeadLetters::open(&ui.amqp, &name).await {
            Ok(letters) => {
                let summary = letters.summary(&Filter::default()).await;
                letters.close().await;
                summary.map(|s| s.by_reason_and_batch).unwrap_or_default()
            }
            Err(_) => Default::default(),
        };
        views.push((name, QueueView { status, dead }));
    }
    page("queues", Some(REFRESH_S * 2), pages::queues(&views))
}
