//! The queue's identifiers, typed so that a job id, a task id, a fencing token and a worker name
//! cannot be passed for one another. Job and task ids are ULIDs (apalis's fetch refuses anything
//! else), kept as their text.

use serde::{Deserialize, Serialize};

use crate::JobsError;

macro_rules! ulid_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(
            Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
            utoipa::ToSchema,
        )]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// A new id, unique and sorting by creation time.
            pub fn generate() -> $name {
                $name(ulid::Ulid::generate().to_string())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = JobsError;

            fn from_str(s: &str) -> Result<$name, JobsError> {
                s.parse::<ulid::Ulid>()
                    .map(|u| $name(u.to_string()))
                    .map_err(|_| JobsError::BadId { what: $what, value: s.to_owned() })
            }
        }

        impl TryFrom<String> for $name {
            type Error = JobsError;

            fn try_from(s: String) -> Result<$name, JobsError> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

ulid_id!(
    /// A kit job: the record users poll (`kit_jobs.id`).
    JobId,
    "job id"
);
ulid_id!(
    /// One apalis task that runs a job; a job gets a new one on every retry or rescue.
    TaskId,
    "task id"
);

/// The fencing token of a job's current attempt: bumped by every claim and requeue, and checked
/// by every write an attempt makes, so a stale attempt can change nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Fence(pub i64);

impl std::fmt::Display for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The name a worker claims jobs under: unique per process start (`kiln-<host>-<pid>-<random>`),
/// with the queue appended per apalis worker.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct WorkerName(String);

impl WorkerName {
    pub fn new(name: impl Into<String>) -> WorkerName {
        WorkerName(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for WorkerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
