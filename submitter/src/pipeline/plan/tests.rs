use super::*;
use std::path::Path;

fn plan() -> Plan {
    let text = r#"
[[stage]]
name = "warp"
each = "raw/*.tif"
command = ["gdalwarp", "{}", "w/{stem}.tif"]
outputs = ["w/{stem}.tif"]

[[stage]]
name = "cog"
each = "warp.outputs"
command = ["gdal_translate", "{}", "c/{name}"]
outputs = ["c/{name}"]

[[stage]]
name = "mosaic"
needs = ["cog"]
command = ["gdalbuildvrt", "m.vrt", "{cog.outputs}"]
outputs = ["m.vrt"]
"#;
    let pipeline = Pipeline::parse(text, Path::new("/d/p.toml"), "q").unwrap();
    let mut plan = Plan::new(pipeline);
    plan.add_items(0, ["raw/a.tif".to_string(), "raw/b.tif".to_string()]);
    plan
}

#[test]
fn an_item_moves_on_as_soon_as_its_own_step_succeeded() {
    let mut p = plan();
    assert_eq!(
        p.ready(),
        [(0, "raw/a.tif".into()), (0, "raw/b.tif".into())]
    );
    p.submitted(0, "raw/a.tif");
    p.submitted(0, "raw/b.tif");
    p.record(0, "raw/a.tif", ItemState::Done);
    // Step 2 of file a is ready while step 1 of file b still runs.
    assert_eq!(p.ready(), [(1, "w/a.tif".into())]);
    assert!(!p.finished(0));
    assert!(!p.counts(1).all_known);
}

#[test]
fn the_barrier_waits_for_every_item_and_gets_all_outputs() {
    let mut p = plan();
    for item in ["raw/a.tif", "raw/b.tif"] {
        p.record(0, item, ItemState::Done);
    }
    p.record(1, "w/a.tif", ItemState::Done);
    assert!(p.ready().iter().all(|(s, _)| *s != 2), "cog not finished");
    p.record(1, "w/b.tif", ItemState::UpToDate);
    assert_eq!(p.ready(), [(2, ONCE.into())]);
    let task = p.task("run1", 2, ONCE).unwrap();
    assert_eq!(
        task.args["argv"],
        json!(["gdalbuildvrt", "m.vrt", "c/a.tif", "c/b.tif"])
    );
    assert_eq!(task.args["cwd"], "/d");
    assert_eq!(p.inputs_of(2, ONCE), ["c/a.tif", "c/b.tif"]);
}

#[test]
fn a_failure_skips_only_its_own_downstream_and_the_barrier() {
    let mut p = plan();
    p.record(0, "raw/a.tif", ItemState::Failed("exit_status".into()));
    p.record(0, "raw/b.tif", ItemState::Done);
    assert_eq!(p.state(1, "w/a.tif"), Some(&ItemState::Skipped));
    assert_eq!(p.ready(), [(1, "w/b.tif".into())]);
    p.record(1, "w/b.tif", ItemState::Done);
    assert_eq!(p.state(2, ONCE), Some(&ItemState::Skipped));
    assert!(p.complete());
    let c = p.counts(1);
    assert_eq!((c.done, c.skipped), (1, 1));
}

#[test]
fn the_first_outcome_counts_and_ids_are_stable() {
    let mut p = plan();
    p.record(0, "raw/a.tif", ItemState::Done);
    p.record(0, "raw/a.tif", ItemState::Failed("late".into()));
    assert_eq!(p.state(0, "raw/a.tif"), Some(&ItemState::Done));
    assert_eq!(task_id("cog", "w/a.tif"), task_id("cog", "w/a.tif"));
    assert_ne!(task_id("cog", "w/a.tif"), task_id("cog", "w/b.tif"));
    let task = p.task("r", 1, "w/a.tif").unwrap();
    assert_eq!(task.labels["stage"], "cog");
    assert_eq!(task.args["outputs"], json!(["c/a.tif"]));
}

/// Counts every stage's items from scratch, as the kept counts must say.
fn recount(p: &Plan, stage: usize) -> StageCounts {
    let mut c = StageCounts {
        known: p.items(stage).len() as u64,
        all_known: p.counts(stage).all_known,
        ..StageCounts::default()
    };
    for state in p.items(stage).values() {
        *c.of(state) += 1;
    }
    c
}

#[test]
fn kept_counts_waiting_sets_and_changes_follow_every_transition() {
    let mut p = plan();
    p.track_changes();
    let check = |p: &Plan| {
        for stage in 0..3 {
            assert_eq!(p.counts(stage), recount(p, stage), "stage {stage}");
            let waiting: Vec<String> = p
                .items(stage)
                .iter()
                .filter(|(_, s)| **s == ItemState::Waiting)
                .map(|(i, _)| i.clone())
                .collect();
            assert_eq!(p.waiting_items(stage, usize::MAX), waiting);
        }
    };
    check(&p);
    p.submitted(0, "raw/a.tif");
    p.submitted(0, "raw/b.tif");
    check(&p);
    p.record(0, "raw/a.tif", ItemState::Done);
    check(&p);
    p.record(0, "raw/b.tif", ItemState::Failed("exit_status".into()));
    check(&p);
    p.submitted(1, "w/a.tif");
    p.record(1, "w/a.tif", ItemState::Done);
    check(&p);
    // The mosaic needs every cog, and one input failed: it is skipped, not run.
    assert_eq!(p.state(2, ONCE), Some(&ItemState::Skipped));
    assert!(p.complete());
    assert_eq!(
        p.take_changes(),
        vec![
            (0, "raw/a.tif".to_string(), ItemState::Submitted),
            (0, "raw/b.tif".to_string(), ItemState::Submitted),
            (0, "raw/a.tif".to_string(), ItemState::Done),
            (
                0,
                "raw/b.tif".to_string(),
                ItemState::Failed("exit_status".into())
            ),
            (1, "w/a.tif".to_string(), ItemState::Submitted),
            (1, "w/a.tif".to_string(), ItemState::Done),
        ],
        "waiting and skipped items are derived, not recorded"
    );
    assert!(p.take_changes().is_empty());
}

#[test]
fn a_submission_taken_back_waits_again_and_leaves_no_change() {
    let mut p = plan();
    p.track_changes();
    p.submitted(0, "raw/a.tif");
    p.submitted(0, "raw/b.tif");
    p.unsubmit(&[(0, "raw/b.tif".to_string())]);
    assert_eq!(p.state(0, "raw/b.tif"), Some(&ItemState::Waiting));
    assert_eq!(p.counts(0), recount(&p, 0));
    assert!(
        p.waiting_items(0, usize::MAX)
            .contains(&"raw/b.tif".to_string())
    );
    // A result that came first wins: the item is not taken back.
    p.record(0, "raw/a.tif", ItemState::Done);
    p.unsubmit(&[(0, "raw/a.tif".to_string())]);
    assert_eq!(p.state(0, "raw/a.tif"), Some(&ItemState::Done));
    assert_eq!(
        p.take_changes(),
        vec![
            (0, "raw/a.tif".to_string(), ItemState::Submitted),
            (0, "raw/a.tif".to_string(), ItemState::Done),
        ],
        "no checkpoint may record a submission the broker did not confirm"
    );
}
