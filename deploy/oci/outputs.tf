output "load_balancer_ip" {
  description = "Public address of the load balancer: the chat page is http://THIS/ and the API http://THIS/v1 (https:// with a certificate)."
  value       = one([for ip in oci_load_balancer_load_balancer.pool.ip_address_details : ip.ip_address if ip.is_public])
}

output "instance_pool_id" {
  description = "OCID of the instance pool (for `oci compute-management instance-pool list-instances`)."
  value       = oci_core_instance_pool.nodes.id
}

output "api_key" {
  description = "The API key Terraform made (null when api_key_sha256s gives the keys): send it as `Authorization: Bearer KEY`. `terraform output -raw api_key` shows it."
  value       = one(random_password.api_key[*].result)
  sensitive   = true
}

output "image_id" {
  description = "OCID of the baked image the pool's nodes boot (null with boot_from_baked_image = false)."
  value       = one(oci_core_image.baked[*].id)
}

output "load_balancer_id" {
  description = "OCID of the load balancer (for `oci lb backend-set-health get --backend-set-name nodes` while rolling the pool)."
  value       = oci_load_balancer_load_balancer.pool.id
}
