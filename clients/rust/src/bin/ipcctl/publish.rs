//! `ipcctl publish`: JSON lines from stdin, published on one Publish stream; one
//! JSON line of answer per message, in order.

use std::io::{self, Write};

use futures::StreamExt;
use ipc_client::{Client, Error, Publication};
use tokio::io::{AsyncBufReadExt, BufReader};

/// How reading stdin ended.
pub enum Input {
    /// Every line was read.
    Done,
    /// Line `n` (1-based) is not a message; nothing after it was sent.
    Bad(usize, String),
}

/// Publishes stdin's lines (objects with `channel`, `op`, and optionally `data`,
/// `headers`, `key`; `channel` and `op` default to the flags). Returns how many
/// messages were refused, the error of the first, and how the input ended.
pub async fn run(
    client: &Client,
    channel: Option<String>,
    op: Option<String>,
) -> Result<(usize, Option<Error>, Input), Error> {
    let (ended, input_end) = tokio::sync::oneshot::channel();
    let lines = BufReader::new(tokio::io::stdin()).lines();
    let messages = futures::stream::unfold(
        (lines, 0usize, Some(ended)),
        move |(mut lines, mut number, mut ended)| {
            let (channel, op) = (channel.clone(), op.clone());
            async move {
                loop {
                    number += 1;
                    let line = match lines.next_line().await {
                        Ok(Some(line)) => line,
                        Ok(None) => {
                            let _ = ended.take()?.send(Input::Done);
                            return None;
                        }
                        Err(e) => {
                            let _ = ended.take()?.send(Input::Bad(number, e.to_string()));
                            return None;
                        }
                    };
                    if line.trim().is_empty() {
                        continue;
                    }
                    match parse(&line, channel.as_deref(), op.as_deref()) {
                        Ok(message) => return Some((message, (lines, number, ended))),
                        Err(why) => {
                            let _ = ended.take()?.send(Input::Bad(number, why));
                            return None;
                        }
                    }
                }
            }
        },
    );
    let mut answers = client.publish(messages).await?;
    let mut refused = 0;
    let mut first_error = None;
    let mut out = io::stdout().lock();
    while let Some(answer) = answers.next().await {
        let line = match answer {
            Ok(stored) => serde_json::to_string(&stored),
            Err(error) => {
                refused += 1;
                let line = serde_json::to_string(&serde_json::json!({
                    "error": error.to_string(),
                    "code": ipc_client::code_name(error.code()),
                }));
                first_error.get_or_insert(error);
                line
            }
        };
        writeln!(out, "{}", line.unwrap_or_default()).map_err(io_error)?;
    }
    out.flush().map_err(io_error)?;
    let input = input_end.await.unwrap_or(Input::Done);
    Ok((refused, first_error, input))
}

fn io_error(e: io::Error) -> Error {
    Error::Config(format!("writing output: {e}"))
}

/// One line as a message, with the defaults of the flags.
pub fn parse(line: &str, channel: Option<&str>, op: Option<&str>) -> Result<Publication, String> {
    let mut message: Publication =
        serde_json::from_str(line).map_err(|e| format!("not a message object: {e}"))?;
    if message.channel.is_empty() {
        message.channel = channel.unwrap_or_default().to_string();
    }
    if message.op.is_empty() {
        message.op = op.unwrap_or_default().to_string();
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_take_the_flags_as_defaults() {
        let m = parse(
            r#"{"data": {"n": 1}, "key": "k1"}"#,
            Some(":jobs"),
            Some("run"),
        )
        .unwrap();
        assert_eq!(
            (m.channel.as_str(), m.op.as_str(), m.key.as_str()),
            (":jobs", "run", "k1")
        );
        let m = parse(r#"{"channel": "a", "op": "b"}"#, Some(":jobs"), None).unwrap();
        assert_eq!((m.channel.as_str(), m.op.as_str()), ("a", "b"));
        assert!(parse("[1]", None, None).is_err());
        assert!(parse(r#"{"chanel": "typo"}"#, None, None).is_err());
    }
}
