//! Finding what a trigger starts: the endpoint that answers an HTTP request.

use std::collections::BTreeMap;

use refinery_domain::{Endpoint, HttpMethod};

use crate::engine::{Engine, ServiceDeployment};
use crate::error::EngineError;

/// The endpoint that answers a request, with the values of its path parameters.
#[derive(Debug, Clone)]
pub struct EndpointRoute {
    pub endpoint: Endpoint,
    pub params: BTreeMap<String, String>,
}

impl Engine {
    /// The endpoint of `account_id`'s `project` (its live deployment) that answers `method`
    /// (upper case) on `path` (below `/http/{account}/{project}`).
    ///
    /// Errors: [`EngineError::ProjectNotFound`], [`EngineError::NoEndpoint`] (no endpoint
    /// has that path), [`EngineError::EndpointMethod`] (some have it, none that method; the
    /// error lists theirs for the `Allow` header).
    pub async fn endpoint(
        &self,
        account_id: &str,
        project: &str,
        method: &str,
        path: &str,
    ) -> Result<EndpointRoute, EngineError> {
        let deployment = self.live_service(account_id, project).await?;
        route(&deployment, project, method, path)
    }

    /// The parsed live deployment of the account's project.
    pub(crate) async fn live_service(
        &self,
        account_id: &str,
        project: &str,
    ) -> Result<std::sync::Arc<ServiceDeployment>, EngineError> {
        let live = self
            .inner
            .invocations
            .live_deployment(account_id, project)
            .await?;
        self.inner
            .deployment_of(account_id, project, live.id, live.number)
            .await?
            .ok_or_else(|| EngineError::ProjectNotFound {
                project: project.to_string(),
            })
    }
}

/// Chooses among the endpoints whose path matches: the most specific path (literal
/// segments before parameters, left to right), then its exact method before `ANY`.
fn route(
    deployment: &ServiceDeployment,
    project: &str,
    method: &str,
    path: &str,
) -> Result<EndpointRoute, EngineError> {
    let matching: Vec<(&Endpoint, BTreeMap<String, String>)> = deployment
        .endpoints
        .iter()
        .filter_map(|e| e.path.matches(path).map(|params| (e, params)))
        .collect();
    if matching.is_empty() {
        return Err(EngineError::NoEndpoint {
            project: project.to_string(),
            method: method.to_string(),
            path: path.to_string(),
        });
    }
    let best = matching
        .iter()
        .filter(|(e, _)| e.method.accepts(method))
        .max_by_key(|(e, _)| (e.path.specificity(), e.method != HttpMethod::Any));
    match best {
        Some((endpoint, params)) => Ok(EndpointRoute {
            endpoint: (*endpoint).clone(),
            params: params.clone(),
        }),
        None => {
            let mut allow: Vec<String> = matching
                .iter()
                .flat_map(|(e, _)| match e.method {
                    HttpMethod::Get => vec!["GET".to_string(), "HEAD".to_string()],
                    other => vec![other.as_str().to_string()],
                })
                .collect();
            if matching.iter().any(|(e, _)| e.cors.is_some()) {
                allow.push("OPTIONS".into());
            }
            allow.sort_unstable();
            allow.dedup();
            Err(EngineError::EndpointMethod {
                project: project.to_string(),
                method: method.to_string(),
                path: path.to_string(),
                allow,
            })
        }
    }
}
