//! `Lock`, `Unlock` and `Limit` on a [`Node`]: validation, grants, the wait bound,
//! then the bus.

use std::time::{Duration, Instant};

use ipc_proto::pb::{
    LimitRequest, LimitResponse, LockRequest, LockResponse, UnlockRequest, UnlockResponse,
};

use super::Session;
use crate::auth::Caller;
use crate::error::NodeError;
use crate::node::{Node, before_grpc_deadline};

impl Node {
    /// Takes, renews or waits for the lease `req.name`. `grpc_timeout` is what is
    /// left of the caller's gRPC deadline (it bounds `wait_ms`); `session` is the
    /// caller's connection when the server tracks it.
    pub async fn lock(
        &self,
        caller: &Caller,
        req: LockRequest,
        grpc_timeout: Option<Duration>,
        session: Option<Session>,
    ) -> Result<LockResponse, NodeError> {
        let max_wait = self.config().max_timeout;
        let wait = Duration::from_millis(u64::from(req.wait_ms));
        if wait > max_wait {
            return Err(NodeError::InvalidArgument(format!(
                "wait_ms {} is above the largest accepted, {} ms",
                req.wait_ms,
                max_wait.as_millis()
            )));
        }
        let wait_until = (req.wait_ms > 0).then(|| {
            let wait = grpc_timeout.map_or(wait, |grpc| wait.min(before_grpc_deadline(grpc)));
            Instant::now() + wait
        });
        let mut spec = super::lock_spec(
            &req,
            self.app(caller),
            &caller.sender,
            caller.is_authenticated(),
            wait_until,
        )?;
        spec.session = session;
        self.authorize(caller, "lock", &spec.name, |g| g.may_lock(&spec.name))?;
        spec.metrics = Some(self.metrics().clone());
        Ok(self.bus().lock(spec, &self.coord).await?)
    }

    /// Frees the lease `req.name` if `req.fence` is the live lease's.
    pub async fn unlock(
        &self,
        caller: &Caller,
        req: UnlockRequest,
    ) -> Result<UnlockResponse, NodeError> {
        let spec = super::unlock_spec(
            &req,
            self.app(caller),
            &caller.sender,
            caller.is_authenticated(),
        )?;
        self.authorize(caller, "unlock", &spec.name, |g| g.may_lock(&spec.name))?;
        let released = self.bus().unlock(spec, &self.coord).await?;
        Ok(UnlockResponse { released })
    }

    /// Draws `cost` tokens from the shared bucket `req.name`.
    pub async fn limit(
        &self,
        caller: &Caller,
        req: LimitRequest,
    ) -> Result<LimitResponse, NodeError> {
        let (name, spec) = super::limit_spec(&req, self.app(caller))?;
        self.authorize(caller, "draw from the limit", &name, |g| g.may_limit(&name))?;
        Ok(self.bus().limit(&name, spec, &self.coord).await?)
    }
}
