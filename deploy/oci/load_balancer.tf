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

resource "oci_load_balancer_listener" "http" {
  load_balancer_id         = oci_load_balancer_load_balancer.pool.id
  name                     = "http"
  default_backend_set_name = oci_load_balancer_backend_set.nodes.name
  port                     = 80
  protocol                 = "HTTP"
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
