use super::*;
use serde_json::json;
use warren_broker::protocol::{PROTOCOL_VERSION, TaskError};

fn record(stderr: &str) -> AttemptRecord {
    AttemptRecord {
        v: PROTOCOL_VERSION,
        batch: "run".into(),
        task_id: "up-1".into(),
        seq: Some(0),
        kind: "exec".into(),
        labels: BTreeMap::from([
            ("stage".to_string(), "up".to_string()),
            ("item".to_string(), "raw/<b>.txt".to_string()),
        ]),
        attempt: 1,
        status: TaskStatus::Failed,
        error: Some(TaskError::new("exit_status", "exit 1")),
        next: AttemptNext::Result,
        args: json!({"argv": ["sh", "-c", "echo '<script>'"]}),
        output: json!({"stderr": stderr, "exit_code": 1}),
        worker: "w<i>".into(),
        host: "h".into(),
        started_at: "2026-12-02T10:00:00Z".into(),
        finished_at: "2026-12-02T10:00:01Z".into(),
        duration_s: 1.0,
        previous_errors: vec![],
    }
}

#[test]
fn task_output_is_escaped_everywhere_it_is_shown() {
    let r = record("<script>alert(1)</script>\n");
    let page = attempts("item", std::slice::from_ref(&r), false).into_string();
    assert!(!page.contains("<script>"), "{page}");
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    assert!(!page.contains("<b>") && !page.contains("<i>"), "{page}");
    let state = RunState {
        v: 1,
        run: "run".into(),
        generation: 1,
        fingerprint: String::new(),
        token: "secret-token".into(),
        workdir: "/data".into(),
        stages: BTreeMap::from([(
            "up".to_string(),
            BTreeMap::from([(
                "raw/<b>.txt".to_string(),
                ItemState::Failed("exit_status".into()),
            )]),
        )]),
        counts: vec![("up".to_string(), Default::default())],
        complete: true,
        edges: vec![],
        delta: false,
    };
    let page = run(&state, &[r], &ItemFilter::default()).into_string();
    assert!(
        !page.contains("<script>") && !page.contains("<b>"),
        "{page}"
    );
    assert!(page.contains("&lt;/script&gt;"), "{page}");
    assert!(
        !page.contains("secret-token"),
        "the run's token is never shown"
    );
    assert!(page.contains("item=raw/%3Cb%3E.txt"), "{page}");
}

#[test]
fn the_item_filter_picks_stage_state_and_path() {
    let failed = ItemState::Failed("x".into());
    let all = ItemFilter::default();
    assert!(shown(&all, "up", "a.tif", &failed));
    let f = ItemFilter {
        state: Some("failed".into()),
        ..Default::default()
    };
    assert!(shown(&f, "up", "a.tif", &failed) && !shown(&f, "up", "a.tif", &ItemState::Done));
    let f = ItemFilter {
        stage: Some("gz".into()),
        ..Default::default()
    };
    assert!(!shown(&f, "up", "a.tif", &failed));
    let f = ItemFilter {
        q: Some("b.".into()),
        ..Default::default()
    };
    assert!(!shown(&f, "up", "a.tif", &failed) && shown(&f, "up", "b.tif", &failed));
}
