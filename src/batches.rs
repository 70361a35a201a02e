//! `warren batches`: the batches the broker holds.

use warren_broker::AmqpSettings;
use warren_broker::depth::ManagementTarget;
use warren_submitter::batches::list_batches;

use crate::cli::*;

/// Runs `warren batches`; returns the exit status.
pub async fn batches(amqp: AmqpSettings, management: &ManagementTarget, json: bool) -> u8 {
    let batches = match list_batches(&amqp, management).await {
        Ok(b) => b,
        Err(e) => {
            return fail(&format!(
                "cannot list batches (it needs the management API): {e}"
            ));
        }
    };
    if json {
        for b in &batches {
            match serde_json::to_string(b) {
                Ok(line) => println!("{line}"),
                Err(e) => return fail(&e.to_string()),
            }
        }
        return EXIT_OK;
    }
    if batches.is_empty() {
        println!("no batches in the broker: every batch was collected, or expired");
        return EXIT_OK;
    }
    let span = |s: Option<u64>| s.map_or("-".to_string(), rounded_span);
    // The queue column is as wide as the longest name, so long names never shift the others.
    let width = batches
        .iter()
        .filter_map(|b| b.queue.as_deref())
        .map(str::len)
        .max()
        .unwrap_or(0)
        .max("QUEUE".len());
    println!(
        "{:<38} {:<width$} {:>7} {:>9} {:>8}  {:<16} {:<8} EXPIRES IN",
        "BATCH", "QUEUE", "TOTAL", "COLLECTED", "WAITING", "STATE", "AGE"
    );
    for b in &batches {
        let state = match (b.collecting, b.total) {
            (true, _) => "being collected",
            (false, None) => "no manifest yet",
            (false, Some(t)) if b.collected + b.waiting >= u64::from(t) => "all results in",
            (false, Some(_)) => "running",
        };
        println!(
            "{:<38} {:<width$} {:>7} {:>9} {:>8}  {:<16} {:<8} {}",
            b.batch,
            b.queue.as_deref().unwrap_or("-"),
            b.total.map_or("?".to_string(), |t| t.to_string()),
            b.collected,
            b.waiting,
            state,
            span(b.age_s),
            span(b.expires_in_s),
        );
    }
    println!("collect one with `warren wait BATCH`; stop one with `warren cancel BATCH`");
    EXIT_OK
}

/// A duration in its two largest units, rounded: `6d 23h`, `4h 5m`, `12m 3s`, `9s`.
fn rounded_span(seconds: u64) -> String {
    let units = [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)];
    let Some(first) = units.iter().position(|(_, size)| seconds >= *size) else {
        return "0s".into();
    };
    let (big, big_size) = units[first];
    let whole = seconds / big_size;
    match units.get(first + 1) {
        Some((small, small_size)) if seconds % big_size >= *small_size => {
            format!("{whole}{big} {}{small}", (seconds % big_size) / small_size)
        }
        _ => format!("{whole}{big}"),
    }
}

#[cfg(test)]
mod tests {
    use super::rounded_span;

    #[test]
    fn spans_show_their_two_largest_units() {
        for (seconds, shown) in [
            (0, "0s"),
            (9, "9s"),
            (723, "12m 3s"),
            (14_700, "4h 5m"),
            (604_800, "7d"),
            (604_793, "6d 23h"),
        ] {
            assert_eq!(rounded_span(seconds), shown, "{seconds}");
        }
    }
}
