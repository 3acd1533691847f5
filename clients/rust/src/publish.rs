//! [`Client::publish`]: bulk publishing on one Publish stream, one answer per message
//! in order — far cheaper per message than one Broadcast call each.

use std::collections::HashMap;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use ipc_proto::pb;
use serde::Deserialize;

use crate::client::payload;
use crate::{Broadcasted, Client, Error};

/// One message of a [`Client::publish`] stream (also what `ipcctl publish` reads,
/// one JSON object a line).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publication {
    /// A channel name; a leading `:` adds the app id.
    #[serde(default)]
    pub channel: String,
    #[serde(default)]
    pub op: String,
    #[serde(default)]
    pub data: serde_json::Value,
    #[serde(default)]
    pub headers: HashMap<String, String>,
    /// Idempotency key: a repeat within the node's window is not stored again
    /// (its answer has `duplicate` set).
    #[serde(default)]
    pub key: String,
}

impl Publication {
    pub fn new(channel: impl Into<String>, op: impl Into<String>, data: serde_json::Value) -> Self {
        Self {
            channel: channel.into(),
            op: op.into(),
            data,
            ..Self::default()
        }
    }

    fn into_request(self) -> pb::BroadcastRequest {
        pb::BroadcastRequest {
            channel: self.channel,
            op: self.op,
            data: payload(&self.data),
            headers: self.headers,
            key: self.key,
        }
    }
}

impl Client {
    /// Publishes `messages` on one Publish stream. The answers come in the order of
    /// the messages, one each, once stored: `Ok` with the id and cursor, or the
    /// error Broadcast would have given for that message alone (the stream goes on).
    /// The stream ends after the answer to the last message; a failure of the
    /// stream itself is its last item. The node reads ahead a bounded window, so a
    /// fast producer waits for it instead of growing either side's memory.
    ///
    /// Not retried: a broken stream's unanswered messages may or may not have been
    /// stored. Give them keys to resend them safely.
    ///
    /// ```no_run
    /// # async fn demo(client: ipc_client::Client) -> Result<(), ipc_client::Error> {
    /// use futures::StreamExt;
    /// use ipc_client::Publication;
    /// let messages = (0..1000).map(|n| Publication::new(":metrics", "tick", n.into()));
    /// let mut answers = client.publish(futures::stream::iter(messages)).await?;
    /// while let Some(answer) = answers.next().await {
    ///     answer?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn publish<S>(
        &self,
        messages: S,
    ) -> Result<BoxStream<'static, Result<Broadcasted, Error>>, Error>
    where
        S: Stream<Item = Publication> + Send + 'static,
    {
        let requests = messages.map(Publication::into_request);
        let answers = self.open_publish(requests).await?;
        Ok(answers
            .map(|answer| match answer {
                Ok(answer) if answer.code == 0 && answer.error.is_empty() => {
                    Ok(Broadcasted::from(answer))
                }
                Ok(refused) => Err(Error::from_status(
                    tonic::Status::new(tonic::Code::from(refused.code), refused.error),
                    "",
                )),
                Err(status) => Err(Error::from_status(status, "")),
            })
            .boxed())
    }
}
