//! The messaging commands: broadcast, send, subscribe, members, reply.

use std::io::{self, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use ipc_client::{Client, Error, MembersFilter, SubscribeOptions};

use crate::Failure;
use crate::cli::Payload;
use crate::output::{members_table, print_json};

pub async fn broadcast(
    client: &Client,
    channel: String,
    op: String,
    payload: Payload,
    key: Option<String>,
) -> Result<(), Failure> {
    let mut call = client.broadcast(channel, op, payload.data());
    if let Some(key) = key {
        call = call.key(key);
    }
    for (key, value) in payload.headers {
        call = call.header(key, value);
    }
    let receipt = call.await?;
    print_json(&receipt)?;
    Ok(())
}

pub async fn send(
    client: &Client,
    target: String,
    op: String,
    payload: Payload,
    timeout: Duration,
) -> Result<(), Failure> {
    let mut call = client.send_msg(&target, op, payload.data(), Some(timeout));
    for (key, value) in payload.headers {
        call = call.header(key, value);
    }
    match call.await {
        Ok(reply) => {
            print_json(&reply)?;
            Ok(())
        }
        Err(Error::ReplyError(reply)) => {
            // Scripts may want the whole reply, error included: it goes to stdout too.
            print_json(&reply)?;
            Err(Failure::Call(Error::ReplyError(reply)))
        }
        Err(Error::DeadlineExceeded(_)) => Err(Failure::Deadline { target, timeout }),
        Err(err) => Err(err.into()),
    }
}

pub async fn subscribe(client: &Client, options: SubscribeOptions) -> Result<(), Failure> {
    let mut messages = client.subscribe(options);
    while let Some(msg) = messages.next().await {
        print_json(&msg?)?;
    }
    Ok(())
}

pub async fn members(client: &Client, filter: MembersFilter, json: bool) -> Result<(), Failure> {
    let mut members = client.members(filter).await?;
    members.sort_by(|a, b| (&a.app, &a.role, &a.id).cmp(&(&b.app, &b.role, &b.id)));
    if json {
        print_json(&members)?;
    } else {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        io::stdout()
            .lock()
            .write_all(members_table(&members, now_ms).as_bytes())?;
    }
    Ok(())
}

pub async fn reply(
    client: &Client,
    reply_to: String,
    op: String,
    payload: Payload,
    error: Option<String>,
) -> Result<(), Failure> {
    let mut call = client.reply(reply_to, op, payload.data());
    if let Some(error) = error {
        call = call.error(error);
    }
    for (key, value) in payload.headers {
        call = call.header(key, value);
    }
    call.await?;
    Ok(())
}
