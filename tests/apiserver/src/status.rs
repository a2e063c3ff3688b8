//! Failures as the real server reports them: a `Status` object with `reason` and `code`
//! (<https://kubernetes.io/docs/reference/using-api/api-concepts/#resource-errors>), which
//! client-go and kube-rs turn into their typed errors.

use serde_json::{Value, json};

use crate::resource::ResourceType;

/// A failed API call, rendered as a `Status` object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason} ({code}): {message}")]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `NotFound`, `AlreadyExists`, `Conflict`, ...
    pub reason: &'static str,
    /// Human-readable message, worded as the real server words it.
    pub message: String,
    /// `details`: the object's name, group and resource, when there is one.
    pub details: Option<Value>,
}

fn details(resource: &ResourceType, name: &str) -> Option<Value> {
    let mut d = json!({"name": name, "kind": resource.plural});
    if !resource.group.is_empty() {
        d["group"] = json!(resource.group);
    }
    Some(d)
}

impl ApiError {
    /// 404 for a named object.
    pub fn not_found(resource: &ResourceType, name: &str) -> Self {
        Self {
            code: 404,
            reason: "NotFound",
            message: format!("{} \"{name}\" not found", resource.qualified_name()),
            details: details(resource, name),
        }
    }

    /// 404 for a path that names nothing served.
    pub fn no_route(path: &str) -> Self {
        Self {
            code: 404,
            reason: "NotFound",
            message: format!("the server could not find the requested resource ({path})"),
            details: None,
        }
    }

    /// 404 for an object created in a namespace that does not exist.
    pub fn namespace_not_found(namespace: &str) -> Self {
        Self {
            code: 404,
            reason: "NotFound",
            message: format!("namespaces \"{namespace}\" not found"),
            details: Some(json!({"name": namespace, "kind": "namespaces"})),
        }
    }

    /// 409 on create of a name that exists.
    pub fn already_exists(resource: &ResourceType, name: &str) -> Self {
        Self {
            code: 409,
            reason: "AlreadyExists",
            message: format!("{} \"{name}\" already exists", resource.qualified_name()),
            details: details(resource, name),
        }
    }

    /// 409 on a write whose resourceVersion or UID precondition does not hold.
    pub fn conflict(resource: &ResourceType, name: &str, why: &str) -> Self {
        Self {
            code: 409,
            reason: "Conflict",
            message: format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                resource.qualified_name()
            ),
            details: details(resource, name),
        }
    }

    /// 409 for a stale resourceVersion in an update.
    pub fn stale(resource: &ResourceType, name: &str) -> Self {
        Self::conflict(
            resource,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// 422 for an object that fails validation, named by kind as the real server names it
    /// (`EgressPolicy.egret.dev "p" is invalid: spec.mode: Unsupported value: ...`).
    pub fn invalid(resource: &ResourceType, name: &str, message: &str) -> Self {
        Self::invalid_fields(resource, name, &[message.to_owned()])
    }

    /// 422 listing every `field: message` violation, each also as a `details.causes` entry
    /// (kubectl prints the causes).
    pub fn invalid_fields(resource: &ResourceType, name: &str, errors: &[String]) -> Self {
        let kind = if resource.group.is_empty() {
            resource.kind.clone()
        } else {
            format!("{}.{}", resource.kind, resource.group)
        };
        let causes: Vec<Value> = errors
            .iter()
            .map(|e| {
                let (field, message) = e.split_once(": ").unwrap_or(("", e));
                let reason = if message.starts_with("Required value") {
                    "FieldValueRequired"
                } else if message.starts_with("Unsupported value") {
                    "FieldValueNotSupported"
                } else if message.starts_with("Too many") {
                    "FieldValueTooMany"
                } else {
                    "FieldValueInvalid"
                };
                json!({"reason": reason, "message": message, "field": field})
            })
            .collect();
        let mut details = details(resource, name);
        if let Some(d) = &mut details {
            d["kind"] = json!(resource.kind);
            d["causes"] = json!(causes);
        }
        let message = match errors {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        };
        Self {
            code: 422,
            reason: "Invalid",
            message: format!("{kind} \"{name}\" is invalid: {message}"),
            details,
        }
    }

    /// 400 for a malformed request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            code: 400,
            reason: "BadRequest",
            message: message.into(),
            details: None,
        }
    }

    /// 405 for a verb the route does not support.
    pub fn method_not_allowed(method: &str) -> Self {
        Self {
            code: 405,
            reason: "MethodNotAllowed",
            message: format!(
                "the server does not allow this method on the requested resource ({method})"
            ),
            details: None,
        }
    }

    /// 410 for a resourceVersion older than the kept history.
    pub fn expired(message: impl Into<String>) -> Self {
        Self {
            code: 410,
            reason: "Expired",
            message: message.into(),
            details: None,
        }
    }

    /// 415 for a body the server cannot decode (protobuf, or strategic merge on a custom
    /// resource).
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self {
            code: 415,
            reason: "UnsupportedMediaType",
            message: format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {content_type:?})"
            ),
            details: None,
        }
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            status["details"] = d.clone();
        }
        status
    }
}
