//! `ipcctl gather` and `ipcctl rollout`: ask a fleet, watch it answer, and exit
//! with a status a script can act on.
//!
//! What is shown:
//! - a line per member as it finishes (`OK  w-1  node a  120 ms`), on stdout;
//! - on a terminal, a progress bar on stderr, redrawn in place (a rollout's members
//!   done of all, its wave; a gather's time waited of its timeout);
//! - at the end a summary: the counts, then a table of every member that was not
//!   OK — who failed, who did not answer, who was never asked;
//! - with `--json`, instead, one JSON object a line: an event per outcome
//!   (`{"wave","outcome"}`), then the ledger (`{"wave","ledger"}`), last;
//! - with `--dry-run`, who would be asked (and in which wave); nobody is.

use std::future::IntoFuture;
use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures::StreamExt;
use ipc_client::{
    Client, Error, Ledger, LedgerState, Operation, Outcome, OutcomeStatus, RolloutEvent,
};

use crate::cli::Payload;
use crate::exit::{self, fail, report};
use crate::output::table;

/// The options `gather` and `rollout` share.
#[derive(Debug, clap::Args)]
pub struct Common {
    /// Role channel (`:worker` is your app's) or a member id.
    pub target: String,
    /// Op, e.g. `worker:restart`.
    pub op: String,
    #[command(flatten)]
    pub payload: Payload,
    /// Only members with this label, as key=value; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = crate::cli::parse_key_value)]
    pub labels: Vec<(String, String)>,
    /// Show who would be asked (and in which wave); ask nobody.
    #[arg(long)]
    pub dry_run: bool,
    /// Operation key: the ledger is kept for an hour; a gather repeated with it
    /// answers the first ledger, a rollout rerun with it resumes (members already OK
    /// are skipped).
    #[arg(long)]
    pub key: Option<String>,
    /// JSON lines on stdout (an event per outcome, the ledger last) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The options only `rollout` has.
#[derive(Debug, clap::Args)]
pub struct Pace {
    /// Members asked at once.
    #[arg(long, default_value_t = 1)]
    pub wave_size: u32,
    /// Stop before the next wave once more than this many members are not OK.
    #[arg(long, default_value_t = 0)]
    pub max_failures: u32,
    /// After its OK, wait this long for a member to be back (subscribed again under
    /// its id), else NOT_READY; 0: an answer is enough.
    #[arg(long, default_value = "0s", value_parser = crate::cli::parse_duration)]
    pub ready_timeout: Duration,
    /// Give up on the whole rollout after this long (default: none); the server then
    /// stops before the next wave.
    #[arg(long, value_parser = crate::cli::parse_duration)]
    pub deadline: Option<Duration>,
}

/// `ipcctl gather`.
pub async fn gather_command(
    client: &Client,
    addr: &str,
    common: Common,
    timeout: Duration,
) -> ExitCode {
    let mut view = View::new(common.json);
    let gather = with_common(
        client.gather(&common.target, &common.op, common.payload.data()),
        &common,
    )
    .timeout(timeout);
    let asked_at = Instant::now();
    let mut call = std::pin::pin!(gather.into_future());
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let ledger = loop {
        tokio::select! {
            ledger = &mut call => break ledger,
            _ = tick.tick() => view.waiting(&common.target, asked_at.elapsed(), timeout),
        }
    };
    view.clear_bar();
    let ledger = match ledger {
        Ok(ledger) => ledger,
        Err(err) => return refused(addr, &err),
    };
    if let Err(err) = view.finish(&ledger, true) {
        return output_failed(&err);
    }
    ExitCode::from(exit_for(&ledger))
}

/// `ipcctl rollout`.
pub async fn rollout_command(
    client: &Client,
    addr: &str,
    common: Common,
    timeout: Duration,
    pace: Pace,
) -> ExitCode {
    let mut view = View::new(common.json);
    let rollout = |dry_run: bool| {
        let mut rollout = with_common(
            client.rollout(&common.target, &common.op, common.payload.data()),
            &common,
        )
        .timeout(timeout)
        .wave_size(pace.wave_size)
        .max_failures(pace.max_failures)
        .ready_timeout(pace.ready_timeout)
        .dry_run(dry_run || common.dry_run);
        if let Some(deadline) = pace.deadline {
            rollout = rollout.deadline(deadline);
        }
        rollout
    };
    // A bar needs the total: on a terminal, the plan first (it asks nobody).
    if view.bar && !common.dry_run {
        match rollout(true).await {
            Ok(plan) => {
                if let Ok(plan) = plan.ledger().await {
                    view.plan(&plan);
                }
            }
            Err(err) => return refused(addr, &err),
        }
    }
    let mut events = match rollout(false).await {
        Ok(events) => events,
        Err(err) => return refused(addr, &err),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = tick.tick() => {
                view.draw_bar();
                continue;
            }
        };
        match event {
            Some(Ok(RolloutEvent {
                ledger: Some(ledger),
                ..
            })) => {
                view.clear_bar();
                if let Err(err) = view.finish(&ledger, false) {
                    return output_failed(&err);
                }
                return ExitCode::from(exit_for(&ledger));
            }
            Some(Ok(event)) => {
                if let Err(err) = view.event(&event) {
                    return output_failed(&err);
                }
            }
            Some(Err(err)) => {
                view.clear_bar();
                let resume = match &common.key {
                    Some(key) => format!("rerun with --key {key} to resume it"),
                    None => "it had no --key: a rerun starts over".to_string(),
                };
                let code = code_for(&err);
                let _ = fail(
                    code,
                    &format!("{err}; the rollout may have stopped: {resume}"),
                );
                return ExitCode::from(code);
            }
            None => {
                view.clear_bar();
                return fail(exit::OTHER, "the rollout stream ended without its ledger");
            }
        }
    }
}

fn with_common<'a, K>(mut operation: Operation<'a, K>, common: &Common) -> Operation<'a, K> {
    for (key, value) in &common.payload.headers {
        operation = operation.header(key, value);
    }
    for (key, value) in &common.labels {
        operation = operation.label(key, value);
    }
    if let Some(key) = &common.key {
        operation = operation.key(key);
    }
    operation.dry_run(common.dry_run)
}

/// The exit status of a finished operation (see `EXIT_CODES`).
pub fn exit_for(ledger: &Ledger) -> u8 {
    match ledger.state {
        LedgerState::DryRun => 0,
        LedgerState::Stopped => exit::STOPPED,
        LedgerState::Done if ledger.all_ok() => 0,
        LedgerState::Done => exit::SOME_FAILED,
        _ => exit::OTHER,
    }
}

/// An operation refused before it started: the usual statuses, and 8 when its key
/// is in use by another run (ABORTED).
fn refused(addr: &str, err: &Error) -> ExitCode {
    match err {
        Error::Aborted(message) => fail(exit::REFUSED, &format!("refused: {message}")),
        other => report(addr, other),
    }
}

fn code_for(err: &Error) -> u8 {
    match err {
        Error::Aborted(_) => exit::REFUSED,
        other => crate::exit::exit_code(other),
    }
}

fn output_failed(err: &io::Error) -> ExitCode {
    if err.kind() == io::ErrorKind::BrokenPipe {
        return ExitCode::SUCCESS;
    }
    fail(exit::OTHER, &format!("writing output: {err}"))
}

/// What is on the screen, and how to add to it.
struct View {
    json: bool,
    /// A progress bar on stderr (a terminal, and not --json).
    bar: bool,
    /// Whether a bar is drawn now (to be cleared before a line is printed).
    drawn: bool,
    /// stdout is a terminal (and NO_COLOR is not set): statuses in colour.
    colour: bool,
    /// The rollout's plan: members and waves in all.
    total: Option<(u32, u32)>,
    done: u32,
    failures: u32,
    wave: u32,
    started: Instant,
}

impl View {
    fn new(json: bool) -> Self {
        let bar = !json && io::stderr().is_terminal();
        let colour = io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Self {
            json,
            bar,
            drawn: false,
            colour,
            total: None,
            done: 0,
            failures: 0,
            wave: 0,
            started: Instant::now(),
        }
    }

    fn plan(&mut self, plan: &Ledger) {
        // Members already OK under the key count as done from the start.
        let to_ask = plan.expected - plan.skipped;
        self.total = Some((to_ask, plan.waves));
    }

    /// One outcome of a rollout.
    fn event(&mut self, event: &RolloutEvent) -> io::Result<()> {
        let Some(outcome) = &event.outcome else {
            return Ok(());
        };
        if outcome.status != OutcomeStatus::Skipped {
            self.done += 1;
        }
        if outcome.status.is_failure() {
            self.failures += 1;
        }
        self.wave = self.wave.max(event.wave);
        if self.json {
            return print_line(&json_line(event));
        }
        self.clear_bar();
        print_line(&outcome_line(outcome, self.colour))?;
        self.draw_bar();
        Ok(())
    }

    /// Gather: still waiting; the bar shows the time.
    fn waiting(&mut self, target: &str, waited: Duration, timeout: Duration) {
        if !self.bar {
            return;
        }
        let fraction = waited.as_secs_f64() / timeout.as_secs_f64().max(0.001);
        let line = format!(
            "{} asking {target}: {:.1}s of {:.1}s",
            bar(fraction, 24),
            waited.as_secs_f64(),
            timeout.as_secs_f64()
        );
        self.show_bar(&line);
    }

    fn draw_bar(&mut self) {
        if !self.bar {
            return;
        }
        let elapsed = self.started.elapsed().as_secs();
        let line = match self.total {
            Some((total, waves)) => format!(
                "{} {}/{total} · wave {}/{waves} · {} not OK · {elapsed}s",
                bar(f64::from(self.done) / f64::from(total.max(1)), 24),
                self.done,
                self.wave.max(1),
                self.failures
            ),
            None => format!(
                "{} done · wave {} · {} not OK · {elapsed}s",
                self.done,
                self.wave.max(1),
                self.failures
            ),
        };
        self.show_bar(&line);
    }

    fn show_bar(&mut self, line: &str) {
        let mut stderr = io::stderr().lock();
        let _ = write!(stderr, "\r\x1b[2K{line}");
        let _ = stderr.flush();
        self.drawn = true;
    }

    fn clear_bar(&mut self) {
        if self.drawn {
            let mut stderr = io::stderr().lock();
            let _ = write!(stderr, "\r\x1b[2K");
            let _ = stderr.flush();
            self.drawn = false;
        }
    }

    /// The end: (a gather's lines per member, which came all at once,) then the
    /// summary — or, with --json, the lines and the ledger.
    fn finish(&mut self, ledger: &Ledger, lines_too: bool) -> io::Result<()> {
        let dry_run = ledger.state == LedgerState::DryRun;
        if self.json {
            if lines_too && !dry_run {
                for outcome in &ledger.outcomes {
                    print_line(&json_line(&RolloutEvent {
                        wave: outcome.wave,
                        outcome: Some(outcome.clone()),
                        ledger: None,
                    }))?;
                }
            }
            return print_line(&json_line(&RolloutEvent {
                wave: ledger.waves,
                outcome: None,
                ledger: Some(ledger.clone()),
            }));
        }
        let mut out = String::new();
        if dry_run {
            out.push_str(&plan_text(ledger));
        } else {
            if lines_too {
                for outcome in &ledger.outcomes {
                    out.push_str(&outcome_line(outcome, self.colour));
                    out.push('\n');
                }
            }
            out.push_str(&summary(ledger));
        }
        let mut stdout = io::stdout().lock();
        stdout.write_all(out.as_bytes())?;
        stdout.flush()
    }
}

fn print_line(line: &str) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()
}

fn json_line(event: &RolloutEvent) -> String {
    serde_json::to_string(event).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// `[#########...............]`, `fraction` of `width` filled.
fn bar(fraction: f64, width: usize) -> String {
    let filled = ((fraction.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

fn status_name(status: OutcomeStatus) -> &'static str {
    match status {
        OutcomeStatus::Pending => "PENDING",
        OutcomeStatus::Ok => "OK",
        OutcomeStatus::Failed => "FAILED",
        OutcomeStatus::NoReply => "NO_REPLY",
        OutcomeStatus::NotReady => "NOT_READY",
        OutcomeStatus::Skipped => "SKIPPED",
    }
}

/// `OK         w-1  node a  120 ms`, then the detail when there is one.
fn outcome_line(outcome: &Outcome, colour: bool) -> String {
    let name = status_name(outcome.status);
    let padded = format!("{name:<9}");
    let status = match (colour, outcome.status) {
        (false, _) => padded,
        (true, OutcomeStatus::Ok | OutcomeStatus::Skipped) => format!("\x1b[32m{padded}\x1b[0m"),
        (true, OutcomeStatus::Failed) => format!("\x1b[31m{padded}\x1b[0m"),
        (true, _) => format!("\x1b[33m{padded}\x1b[0m"),
    };
    let mut line = format!(
        "{status}  {}  node {}  {} ms",
        outcome.member, outcome.node, outcome.duration_ms
    );
    if !outcome.detail.is_empty() {
        line.push_str("  ");
        line.push_str(&outcome.detail);
    }
    line
}

/// The dry run: who would be asked, in which wave.
fn plan_text(ledger: &Ledger) -> String {
    let mut rows = vec![["MEMBER", "NODE", "WAVE"].map(String::from).to_vec()];
    for outcome in &ledger.outcomes {
        let wave = match (outcome.status, outcome.wave) {
            (OutcomeStatus::Skipped, _) => "skipped (OK before)".to_string(),
            (_, 0) => "-".to_string(),
            (_, wave) => wave.to_string(),
        };
        rows.push(vec![outcome.member.clone(), outcome.node.clone(), wave]);
    }
    let waves = if ledger.waves > 0 {
        format!(" in {} wave(s)", ledger.waves)
    } else {
        String::new()
    };
    let asked = ledger.expected - ledger.skipped;
    format!(
        "dry run of {} on {}: {asked} member(s) would be asked{waves}; nobody was asked\n{}",
        ledger.op,
        ledger.target,
        table(&rows)
    )
}

/// The counts, then every member that was not OK: who failed, who did not answer,
/// who was never asked.
pub fn summary(ledger: &Ledger) -> String {
    let state = match ledger.state {
        LedgerState::Done => "DONE",
        LedgerState::Stopped => "STOPPED by the failure budget",
        LedgerState::Cancelled => "CANCELLED",
        LedgerState::Running => "RUNNING",
        LedgerState::DryRun => "DRY_RUN",
        LedgerState::Unspecified => "UNSPECIFIED",
    };
    let rollout = ledger.waves > 0;
    let pending = ledger.with_status(OutcomeStatus::Pending).count() as u32;
    let mut counts = vec![format!("{} ok", ledger.ok)];
    for (count, what) in [
        (ledger.failed, "failed"),
        (ledger.no_reply, "no reply"),
        (ledger.not_ready, "not ready"),
        (ledger.skipped, "skipped (OK before)"),
        (pending, "not asked"),
    ] {
        if count > 0 {
            counts.push(format!("{count} {what}"));
        }
    }
    let mut out = format!(
        "\n{} {}: {} on {}: {state}\n{} member(s): {}\n",
        if rollout { "rollout" } else { "gather" },
        ledger.id,
        ledger.op,
        ledger.target,
        ledger.expected,
        counts.join(", "),
    );
    let not_ok: Vec<&Outcome> = ledger
        .outcomes
        .iter()
        .filter(|o| !matches!(o.status, OutcomeStatus::Ok | OutcomeStatus::Skipped))
        .collect();
    if not_ok.is_empty() {
        out.push_str("every member answered OK\n");
        return out;
    }
    let header: &[&str] = if rollout {
        &["MEMBER", "NODE", "STATUS", "WAVE", "DETAIL"]
    } else {
        &["MEMBER", "NODE", "STATUS", "DETAIL"]
    };
    let mut rows = vec![header.iter().map(|h| h.to_string()).collect::<Vec<_>>()];
    for outcome in not_ok {
        let detail = match (outcome.status, outcome.detail.as_str()) {
            (OutcomeStatus::Pending, "") => "not asked: stopped before its wave".to_string(),
            (_, detail) => detail.to_string(),
        };
        let mut row = vec![
            outcome.member.clone(),
            outcome.node.clone(),
            status_name(outcome.status).to_string(),
        ];
        if rollout {
            row.push(outcome.wave.to_string());
        }
        row.push(detail);
        rows.push(row);
    }
    out.push_str(&table(&rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(member: &str, status: OutcomeStatus, wave: u32, detail: &str) -> Outcome {
        Outcome {
            member: member.into(),
            node: "a".into(),
            status,
            reply: None,
            wave,
            duration_ms: 12,
            detail: detail.into(),
        }
    }

    fn ledger(state: LedgerState, outcomes: Vec<Outcome>) -> Ledger {
        let count = |s| outcomes.iter().filter(|o| o.status == s).count() as u32;
        Ledger {
            id: "op-1".into(),
            target: "shop:worker".into(),
            op: "deploy".into(),
            state,
            expected: outcomes.len() as u32,
            ok: count(OutcomeStatus::Ok),
            failed: count(OutcomeStatus::Failed),
            no_reply: count(OutcomeStatus::NoReply),
            not_ready: count(OutcomeStatus::NotReady),
            skipped: count(OutcomeStatus::Skipped),
            waves: 3,
            outcomes,
        }
    }

    #[test]
    fn exit_status_says_how_it_ended() {
        let ok = outcome("a", OutcomeStatus::Ok, 1, "");
        let failed = outcome("b", OutcomeStatus::Failed, 2, "replied with error: x");
        assert_eq!(exit_for(&ledger(LedgerState::Done, vec![ok.clone()])), 0);
        let skipped = outcome("s", OutcomeStatus::Skipped, 0, "");
        assert_eq!(exit_for(&ledger(LedgerState::Done, vec![skipped])), 0);
        assert_eq!(
            exit_for(&ledger(LedgerState::Done, vec![ok.clone(), failed.clone()])),
            exit::SOME_FAILED
        );
        assert_eq!(
            exit_for(&ledger(LedgerState::Stopped, vec![ok, failed])),
            exit::STOPPED
        );
        assert_eq!(exit_for(&ledger(LedgerState::DryRun, vec![])), 0);
        assert_eq!(
            exit_for(&ledger(LedgerState::Cancelled, vec![])),
            exit::OTHER
        );
    }

    #[test]
    fn the_summary_names_who_failed_and_who_did_not_answer() {
        let text = summary(&ledger(
            LedgerState::Stopped,
            vec![
                outcome("w-1", OutcomeStatus::Ok, 1, ""),
                outcome(
                    "w-2",
                    OutcomeStatus::Failed,
                    2,
                    "replied with error: disk full",
                ),
                outcome("w-3", OutcomeStatus::NoReply, 2, "no answer within 2000 ms"),
                outcome("w-4", OutcomeStatus::Pending, 3, ""),
            ],
        ));
        assert!(
            text.contains("rollout op-1: deploy on shop:worker: STOPPED by the failure budget")
        );
        assert!(text.contains("4 member(s): 1 ok, 1 failed, 1 no reply, 1 not asked\n"));
        let rows: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("MEMBER"))
            .collect();
        assert_eq!(
            rows,
            [
                "MEMBER  NODE  STATUS    WAVE  DETAIL",
                "w-2     a     FAILED    2     replied with error: disk full",
                "w-3     a     NO_REPLY  2     no answer within 2000 ms",
                "w-4     a     PENDING   3     not asked: stopped before its wave",
            ]
        );
        let all_ok = summary(&ledger(
            LedgerState::Done,
            vec![outcome("w-1", OutcomeStatus::Ok, 1, "")],
        ));
        assert!(all_ok.ends_with("every member answered OK\n"), "{all_ok}");
        // A gather (no waves): no WAVE column.
        let gathered = summary(&Ledger {
            waves: 0,
            ..ledger(
                LedgerState::Done,
                vec![outcome(
                    "w-3",
                    OutcomeStatus::NoReply,
                    0,
                    "no answer within 5000 ms",
                )],
            )
        });
        assert!(
            gathered.contains(
                "gather op-1: deploy on shop:worker: DONE\n1 member(s): 0 ok, 1 no reply\n"
            ),
            "{gathered}"
        );
        assert!(
            gathered.contains(
                "MEMBER  NODE  STATUS    DETAIL\nw-3     a     NO_REPLY  no answer within 5000 ms\n"
            ),
            "{gathered}"
        );
    }

    #[test]
    fn lines_and_bars() {
        assert_eq!(
            outcome_line(
                &outcome("w-2", OutcomeStatus::Failed, 1, "replied with error: x"),
                false
            ),
            "FAILED     w-2  node a  12 ms  replied with error: x"
        );
        assert!(
            outcome_line(&outcome("w-1", OutcomeStatus::Ok, 1, ""), true).starts_with("\x1b[32mOK")
        );
        assert_eq!(bar(0.5, 10), "[#####.....]");
        assert_eq!(bar(2.0, 4), "[####]");
        assert_eq!(bar(0.0, 4), "[....]");
    }
}
