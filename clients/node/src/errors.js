'use strict';
// Errors of ipc.v1 calls. Each is an Error with `code` (the gRPC status number, as in
// @grpc/grpc-js: `grpc.status.UNAVAILABLE`...) and `details` (the server's message),
// with one class per outcome a caller handles, so both `err.code === 14` and
// `err instanceof NoRespondersError` work.

const { status } = require('@grpc/grpc-js');

class IpcError extends Error {
  constructor(details, code) {
    super(details);
    this.name = this.constructor.name;
    this.code = code;
    this.details = details;
  }
}

/** SendMsg: no responder of the target, tails do not count (UNAVAILABLE "no responders"). */
class NoRespondersError extends IpcError {}
/** SendMsg: no answer within the timeout (DEADLINE_EXCEEDED). */
class DeadlineExceededError extends IpcError {}
/** Malformed request (INVALID_ARGUMENT): bad channel, empty op, pattern where a name is needed. */
class InvalidArgumentError extends IpcError {}
/** Reply: the request is unknown or its sender stopped waiting (NOT_FOUND). */
class NotFoundError extends IpcError {}
/** Too big a message, or a subscriber too slow to keep up (RESOURCE_EXHAUSTED). */
class ResourceExhaustedError extends IpcError {}
/** The server cannot be reached or is shutting down (UNAVAILABLE). */
class UnavailableError extends IpcError {}
/** Gather/Rollout: the key was used by a different operation (FAILED_PRECONDITION). */
class FailedPreconditionError extends IpcError {}
/** Gather/Rollout: a run under this key is still going, coordinated elsewhere (ABORTED). */
class AbortedError extends IpcError {}

/** SendMsg: the target answered with `error` set; the whole reply is in `reply`. */
class ReplyError extends IpcError {
  constructor(reply) {
    super(reply.error, status.OK);
    this.reply = reply;
  }
}

const BY_CODE = {
  [status.ABORTED]: AbortedError,
  [status.DEADLINE_EXCEEDED]: DeadlineExceededError,
  [status.FAILED_PRECONDITION]: FailedPreconditionError,
  [status.INVALID_ARGUMENT]: InvalidArgumentError,
  [status.NOT_FOUND]: NotFoundError,
  [status.RESOURCE_EXHAUSTED]: ResourceExhaustedError,
  [status.UNAVAILABLE]: UnavailableError,
};

/** The IpcError matching a grpc-js error's status. */
function fromGrpcError(error) {
  if (error instanceof IpcError) return error;
  const details = error.details || error.message;
  if (error.code === status.UNAVAILABLE && /no responders/i.test(details)) {
    return new NoRespondersError(details, error.code);
  }
  const Kind = BY_CODE[error.code] || IpcError;
  return new Kind(details, error.code);
}

module.exports = {
  IpcError,
  NoRespondersError,
  DeadlineExceededError,
  InvalidArgumentError,
  NotFoundError,
  ResourceExhaustedError,
  UnavailableError,
  FailedPreconditionError,
  AbortedError,
  ReplyError,
  fromGrpcError,
};
