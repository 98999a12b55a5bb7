# A flexible public load balancer in front of the pool. It sends each request to the node with
# the fewest open connections (a stream holds its connection) among those whose
# /health/ready answers 200: loaded, and not draining.

resource "oci_load_balancer_load_balancer" "pool" {
  compartment_id             = var.compartment_ocid
  display_name               = "${var.name}-lb"
  shape                      = "flexible"
  subnet_ids                 = [oci_core_subnet.lb.id]
  is_private                 = false
  network_security_group_ids = [oci_core_network_security_group.lb.id]
  shape_details {
    minimum_bandwidth_in_mbps = 10
    maximum_bandwidth_in_mbps = var.lb_max_bandwidth_mbps
  }
}

resource "oci_load_balancer_backend_set" "nodes" {
  load_balancer_id = oci_load_balancer_load_balancer.pool.id
  name             = "nodes"
  policy           = "LEAST_CONNECTIONS"
  health_checker {
    protocol          = "HTTP"
    port              = 80
    url_path          = "/health/ready"
    return_code       = 200
    interval_ms       = var.health_check_interval_ms
    timeout_in_millis = var.health_check_timeout_ms
    retries           = var.health_check_retries
  }
}

# With a certificate, port 80 serves nothing: every request is sent to the same place on HTTPS
# (a key sent in clear once is still a leaked key, but a browser and most clients come back on
# HTTPS and stay there).
resource "oci_load_balancer_rule_set" "https_redirect" {
  count            = var.certificate_ocid == null ? 0 : 1
  load_balancer_id = oci_load_balancer_load_balancer.pool.id
  name             = "https_redirect"
  items {
    action = "REDIRECT"
    conditions {
      attribute_name  = "PATH"
      attribute_value = "/"
      operator        = "FORCE_LONGEST_PREFIX_MATCH"
    }
    redirect_uri {
      protocol = "HTTPS"
      port     = 443
      host     = "{host}"
      path     = "{path}"
      query    = "{query}"
    }
    # 308, not 301: a POST is repeated as a POST.
    response_code = 308
  }
}

resource "oci_load_balancer_listener" "http" {
  load_balancer_id         = oci_load_balancer_load_balancer.pool.id
  name                     = "http"
  default_backend_set_name = oci_load_balancer_backend_set.nodes.name
  port                     = 80
  protocol                 = "HTTP"
  rule_set_names           = oci_load_balancer_rule_set.https_redirect[*].name
  connection_configuration {
    idle_timeout_in_seconds = var.listener_idle_timeout_seconds
  }
}

resource "oci_load_balancer_listener" "https" {
  count                    = var.certificate_ocid == null ? 0 : 1
  load_balancer_id         = oci_load_balancer_load_balancer.pool.id
  name                     = "https"
  default_backend_set_name = oci_load_balancer_backend_set.nodes.name
  port                     = 443
  protocol                 = "HTTP"
  connection_configuration {
    idle_timeout_in_seconds = var.listener_idle_timeout_seconds
  }
  ssl_configuration {
    certificate_ids         = [var.certificate_ocid]
    cipher_suite_name       = "oci-modern-ssl-cipher-suite-v1"
    protocols               = ["TLSv1.2"]
    verify_peer_certificate = false
  }
}
