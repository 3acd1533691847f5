//! Fleet operations: Gather (ask every responder of a target, a ledger of who
//! answered) and Rollout (the same in waves, with a failure budget), with keys that
//! make a repeat return the first ledger and a rerun resume it.
//!
//! Transport-free: the bus supplies the fleet's members (responders resolved by
//! [`crate::responders`]), request routing to one member (by its id), and the
//! store of keyed records ([`crate::Bus::store_operation`]).
//!
//! - [`ledger`]: the ledger, outcomes and counts, the stored record.
//! - [`gather`]: `Node::gather`, all at once.
//! - [`rollout`]: `Node::rollout`, in waves, with readiness.
//! - [`store`]: records kept in a node's memory.
//! - [`claim`]: one run of a keyed operation at a time, fleet-wide.

pub mod claim;
pub mod gather;
pub mod ledger;
pub mod rollout;
pub mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc_proto::pb::{Ledger, Msg};

use crate::auth::Caller;
use crate::channel;
use crate::error::{NodeError, RequestError};
use crate::hub::{DEADLINE_HEADER, OperationHanding, OperationReplies};
use crate::node::Node;
use crate::outbound::OperationRequest;
use crate::queue::Charge;
use crate::responders;
use crate::telemetry::{self, Hop, TraceContext};
use ledger::{Kind, StoredOperation};
use opentelemetry::KeyValue;

/// Header on every request of an operation: the ledger id (the same on a rerun).
pub const OP_ID_HEADER: &str = "ipc-op-id";
/// Header on every request of a keyed operation: its key, so a worker can tell a
/// repeat.
pub const OP_KEY_HEADER: &str = "ipc-op-key";
/// Header on every request of a Rollout: the 1-based wave.
pub const OP_WAVE_HEADER: &str = "ipc-op-wave";

/// How long a keyed operation's record is kept.
pub const KEY_TTL: Duration = Duration::from_secs(3600);

/// What an operation asks, validated.
pub(crate) struct Asked {
    pub kind: Kind,
    pub target: String,
    pub op: String,
    pub data: Option<prost_types::Value>,
    pub headers: HashMap<String, String>,
    pub labels: HashMap<String, String>,
    /// The key as given, and as stored (scoped to the app).
    pub key: Option<(String, String)>,
    pub sender: String,
}

impl Asked {
    pub fn fingerprint(&self) -> String {
        ledger::fingerprint(
            self.kind,
            &self.target,
            &self.op,
            self.data.as_ref(),
            &self.labels,
        )
    }
}

/// A responder an operation asks: all its ledger names of a member.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Responder {
    pub id: String,
    pub node: String,
}

/// The fields common to GatherRequest and RolloutRequest.
pub(crate) struct Fields {
    pub target: String,
    pub op: String,
    pub data: Option<prost_types::Value>,
    pub headers: HashMap<String, String>,
    pub labels: HashMap<String, String>,
    pub key: String,
    pub encoded_len: usize,
}

/// The headers of an operation's request to one member: the caller's, then the
/// operation's id, its key, the wave (Rollout) and the member.
fn member_headers(
    asked: &Asked,
    ledger_id: &str,
    member: &str,
    wave: Option<u32>,
) -> HashMap<String, String> {
    let mut headers = operation_headers(asked, ledger_id, wave);
    headers.insert(responders::MEMBER_HEADER.into(), member.to_string());
    headers
}

/// [`member_headers`] without the member: what all members' requests share.
fn operation_headers(asked: &Asked, ledger_id: &str, wave: Option<u32>) -> HashMap<String, String> {
    let mut headers = HashMap::with_capacity(asked.headers.len() + 4);
    headers.extend(asked.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
    headers.insert(OP_ID_HEADER.into(), ledger_id.to_string());
    if let Some((key, _)) = &asked.key {
        headers.insert(OP_KEY_HEADER.into(), key.clone());
    }
    if let Some(wave) = wave {
        headers.insert(OP_WAVE_HEADER.into(), wave.to_string());
    }
    headers
}

/// An operation's request as handed straight to local responders
/// ([`Node::hand_to_responder`]): what its members' requests share, built and
/// encoded once.
pub(crate) struct Handing {
    operation: Arc<OperationRequest>,
    /// Its memory, counted once in the node's queued bytes.
    charge: Arc<Charge>,
    /// The context its requests carry in their headers, if any.
    trace: Option<TraceContext>,
    /// Its deadline header, as a number.
    deadline_ms: Option<i64>,
}

impl Node {
    /// Checks an operation's input as SendMsg checks a request's, and its key.
    pub(crate) fn check_operation(
        &self,
        caller: &Caller,
        kind: Kind,
        fields: Fields,
    ) -> Result<Asked, NodeError> {
        self.check_size(fields.encoded_len)?;
        crate::node::check_op(&fields.op)?;
        self.check_headers(&fields.headers)?;
        self.check_map("labels", &fields.labels)?;
        if fields.target.is_empty() {
            return Err(NodeError::InvalidArgument(
                "target is empty: name a role channel (\":worker\") or a member id".into(),
            ));
        }
        let app = self.app(caller).unwrap_or_default().to_string();
        let target = channel::parse_name(
            &fields.target,
            Some(&app).filter(|a| !a.is_empty()).map(String::as_str),
        )?;
        self.authorize(caller, "send to", &target, |g| g.may_send(&target))?;
        let key = match fields.key.as_str() {
            "" => None,
            key if key.len() > 256 || key.chars().any(char::is_control) => {
                return Err(NodeError::InvalidArgument(
                    "key must be at most 256 bytes, without control characters".into(),
                ));
            }
            key => Some((key.to_string(), format!("{}/{key}", kind_scope(&app)))),
        };
        Ok(Asked {
            kind,
            target,
            op: fields.op,
            data: fields.data,
            headers: fields.headers,
            labels: fields.labels,
            key,
            sender: caller.sender.clone(),
        })
    }

    /// The span of a Gather or Rollout call, under the caller's trace context (or
    /// its headers').
    pub(crate) fn accept_operation(
        &self,
        name: &'static str,
        caller: &Caller,
        headers: &HashMap<String, String>,
        target: &str,
        op: &str,
    ) -> Hop {
        let parent = caller
            .trace
            .clone()
            .or_else(|| TraceContext::from_headers(headers));
        Hop::accept(name, parent, || {
            vec![
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.method", name),
                KeyValue::new("ipc.node", self.name().to_string()),
                KeyValue::new("ipc.target", target.to_string()),
                KeyValue::new("ipc.op", op.to_string()),
            ]
        })
    }

    /// The responders of `target` fleet-wide with every one of `labels`, once each,
    /// in a stable order (member id, then node).
    pub(crate) async fn resolve_responders(
        &self,
        target: &str,
        labels: &HashMap<String, String>,
    ) -> Result<Vec<Responder>, NodeError> {
        let all = self
            .bus()
            .members(self.hub().members_for_request(target, !labels.is_empty()))
            .await?;
        let mut members: Vec<Responder> = all
            .into_iter()
            .filter(|m| responders::responds_to(m, target))
            .filter(|m| labels.iter().all(|(k, v)| m.labels.get(k) == Some(v)))
            .map(|m| Responder {
                id: m.id,
                node: m.node,
            })
            .collect();
        // Only (id, node) is kept: the copies of one are alike, and small to sort.
        members.sort_unstable();
        members.dedup();
        Ok(members)
    }

    /// Asks one member (by its id) for an operation and waits until `deadline`.
    pub(crate) async fn ask_member(
        &self,
        asked: &Asked,
        ledger_id: &str,
        member: &str,
        wave: Option<u32>,
        deadline: Instant,
    ) -> Result<Msg, RequestError> {
        let mut headers = member_headers(asked, ledger_id, member, wave);
        let mut route = Hop::child("route", telemetry::Kind::Internal, &headers, || {
            let mut attributes = vec![
                KeyValue::new("ipc.member", member.to_string()),
                KeyValue::new("ipc.op_id", ledger_id.to_string()),
            ];
            if let Some(wave) = wave {
                attributes.push(KeyValue::new("ipc.wave", i64::from(wave)));
            }
            attributes
        });
        route.stamp(&mut headers);
        let result = self.ask_routed(member, headers, asked, deadline).await;
        if let Err(error) = &result {
            route.fail(|| error.to_string());
        }
        result
    }

    /// What an operation's requests handed straight to local responders share
    /// ([`Node::hand_to_responder`]): the request `ask_member` sends, but for the
    /// member header, `id` and `reply_to`, with its deadline header. `None` while
    /// spans are recorded (the full path records its hops).
    pub(crate) fn operation_handing(
        &self,
        asked: &Asked,
        ledger_id: &str,
        deadline: Instant,
    ) -> Option<Handing> {
        if telemetry::enabled() {
            return None;
        }
        let mut headers = operation_headers(asked, ledger_id, None);
        let left = deadline.saturating_duration_since(Instant::now());
        headers.insert(
            DEADLINE_HEADER.into(),
            (crate::now_ms() + left.as_millis() as i64).to_string(),
        );
        let trace = TraceContext::from_headers(&headers);
        let shared = Msg {
            id: String::new(),
            ..self.operation_request(asked, headers)
        };
        let deadline_ms = crate::hub::deadline_ms(&shared.headers);
        let operation = Arc::new(OperationRequest::new(shared));
        let charge = self.hub().operation_charge(&operation);
        Some(Handing {
            operation,
            charge,
            trace,
            deadline_ms,
        })
    }

    /// An operation's request handed at once to a local responder of `member`
    /// (index `index` of the operation), without a future of the whole request
    /// path per member: its reply completes slot `index` of `replies`. `None`
    /// when no local responder takes it first (a hook, a member of another node,
    /// none left): then [`Node::ask_member`] asks it. The responder gets the
    /// request `ask_member` would send. `Some`: the counter of its `reply_to`.
    pub(crate) fn hand_to_responder(
        &self,
        handing: &Handing,
        replies: &Arc<OperationReplies>,
        member: &str,
        index: usize,
    ) -> Option<u64> {
        // No hook answers first; whether a local responder takes it is known as
        // it is handed (one registry lookup per member).
        if self.hook_answers(member, &handing.operation.shared().op) {
            return None;
        }
        let shared = OperationHanding {
            operation: &handing.operation,
            charge: &handing.charge,
            trace: handing.trace.as_ref(),
            deadline_ms: handing.deadline_ms,
            replies,
        };
        self.hub()
            .deliver_operation_request(member, &shared, index, || self.new_id())
    }

    /// The request an operation sends one member, with its headers.
    fn operation_request(&self, asked: &Asked, headers: HashMap<String, String>) -> Msg {
        Msg {
            op: asked.op.clone(),
            data: asked.data.clone(),
            headers,
            id: self.new_id(),
            channel: asked.target.clone(),
            sender: asked.sender.clone(),
            ts_ms: crate::now_ms(),
            ..Msg::default()
        }
    }

    async fn ask_routed(
        &self,
        member: &str,
        headers: HashMap<String, String>,
        asked: &Asked,
        deadline: Instant,
    ) -> Result<Msg, RequestError> {
        let request = self.operation_request(asked, headers);
        // The built-ins of a member that is a node (a sidecar's pod) answer an
        // operation as they answer any caller the node did not authenticate.
        let caller = Caller {
            sender: asked.sender.clone(),
            ..Caller::default()
        };
        self.route_request(&caller, member, request, deadline).await
    }

    /// The record stored under an operation's key: `None` for a first run. A key
    /// used by the other kind of operation, or for a different target, op, data
    /// or labels, is refused.
    pub(crate) async fn load_operation(
        &self,
        asked: &Asked,
    ) -> Result<Option<StoredOperation>, NodeError> {
        let Some((key, scoped)) = &asked.key else {
            return Ok(None);
        };
        let Some(bytes) = self.bus().load_operation(scoped).await? else {
            return Ok(None);
        };
        let Some(record) = StoredOperation::decode_bytes(&bytes) else {
            return Err(NodeError::Internal(format!(
                "the record of key {key:?} is unreadable"
            )));
        };
        if record.kind != asked.kind.as_str() {
            return Err(NodeError::FailedPrecondition(format!(
                "key {key:?} was used by a {}; a key belongs to one kind of operation",
                record.kind
            )));
        }
        if record.fingerprint != asked.fingerprint() {
            return Err(NodeError::FailedPrecondition(format!(
                "key {key:?} was used for a different operation (target, op, data or labels); use a new key"
            )));
        }
        Ok(Some(record))
    }

    /// Stores an operation's ledger under its key (nothing without a key).
    pub(crate) async fn store_operation(
        &self,
        asked: &Asked,
        ledger: &Ledger,
    ) -> Result<(), NodeError> {
        let Some((_, scoped)) = &asked.key else {
            return Ok(());
        };
        let record = StoredOperation {
            kind: asked.kind.as_str().to_string(),
            fingerprint: asked.fingerprint(),
            ledger: Some(ledger.clone()),
            updated_ms: crate::now_ms(),
        };
        self.bus()
            .store_operation(scoped, record.encode_bytes(), KEY_TTL)
            .await?;
        Ok(())
    }
}

/// Puts an operation's ledger id on its log lines (`op_id`) from now on.
fn log_op_id(id: &str) {
    tracing::Span::current().record("op_id", id);
}

/// Keys are scoped to the app (`_` for callers without one).
fn kind_scope(app: &str) -> &str {
    if app.is_empty() { "_" } else { app }
}
