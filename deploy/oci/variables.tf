# Every input of the pool. Only the first four have no default.

variable "region" {
  type        = string
  description = "OCI region to build the pool in, e.g. \"eu-frankfurt-1\". It must offer the VM.Standard.A2.Flex shape."
}

variable "compartment_ocid" {
  type        = string
  description = "OCID of the compartment that holds every resource made here."
}

variable "image_ocid" {
  type        = string
  description = "OCID of a stock Ubuntu 22.04 or 24.04 aarch64 platform image in this region (cloud-init.yaml bootstraps either): the builder bakes the pool's image from it, or, with boot_from_baked_image = false, every node boots it and installs at first boot."
}

variable "tenancy_ocid" {
  type        = string
  description = "OCID of the tenancy: the nodes' dynamic group and its policy live in its root compartment."
}

variable "oci_config_profile" {
  type        = string
  default     = "DEFAULT"
  description = "Profile in ~/.oci/config that the provider authenticates with."
}

variable "name" {
  type        = string
  default     = "gguf-appliance"
  description = "Prefix of every resource's display name."
}

# --- what each node runs ---

variable "boot_from_baked_image" {
  type        = bool
  default     = true
  description = "true: a builder instance bakes an image (install, llama.cpp compiled, the model fetched and verified) and the pool's nodes boot it, ready about a minute after launch. false: the nodes boot image_ocid and each installs, compiles and downloads at first boot (about 10 minutes). Baking runs the OCI CLI (`oci`) on the machine running Terraform, to wait for the builder to power off."
}

variable "bake_timeout_minutes" {
  type        = number
  default     = 60
  description = "Minutes Terraform waits for the builder to finish the bake and power off (about 15 for TinyLlama: apt, a 7-minute compile, the model) before it fails the apply and leaves the builder running to be looked at (its serial console, /var/log/cloud-init-output.log)."
  validation {
    condition     = var.bake_timeout_minutes >= 15 && var.bake_timeout_minutes <= 240
    error_message = "bake_timeout_minutes must be between 15 and 240."
  }
}

variable "model" {
  type        = string
  default     = "hf://TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF/tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf"
  description = "Model every node serves, unless model_file puts one in the pool's bucket: GGUF_APPLIANCE_MODEL in the node's /etc/gguf-appliance/appliance.env (hf://OWNER/REPO/FILE.gguf[@REV], https://..., or bundled:NAME). Changing it bakes a new image (or, on the stock image, makes a new instance configuration): nodes launched after that serve the new model."
  validation {
    # It becomes one line of the user data: no white space, and no '$', which replace() reads
    # as a reference to a regular-expression group.
    condition     = can(regex("^(hf://|https://|bundled:)[^\\s$]+$", var.model))
    error_message = "model must be hf://OWNER/REPO/FILE.gguf[@REV], an https:// URL or bundled:NAME, with no spaces or '$'."
  }
}

variable "model_sha256" {
  type        = string
  default     = null
  description = "SHA-256 of the model file, pinned: each node (and the builder) refuses a file that differs (GGUF_APPLIANCE_MODEL_SHA256). Needed with model_file; without it an hf:// model is checked against the Hub's own sha256 of the file."
  validation {
    condition     = var.model_sha256 == null || can(regex("^[0-9a-f]{64}$", var.model_sha256))
    error_message = "model_sha256 must be 64 lower-case hex digits (`sha256sum FILE`)."
  }
}

variable "model_file" {
  type        = string
  default     = null
  description = "Path on the machine running Terraform of a .gguf file to keep in an Object Storage bucket of the pool's region: Terraform uploads it, and the nodes (and the builder) fetch it through a read-only pre-authenticated request for that object, checked against model_sha256, instead of `model`. For a model that should not come from the Hub, or a pool booting the stock image that fetches faster in-region."
  validation {
    condition     = var.model_file == null || (endswith(coalesce(var.model_file, "-"), ".gguf") && var.model_sha256 != null && var.model_par_expires != null)
    error_message = "model_file must name a .gguf file, and needs model_sha256 and model_par_expires."
  }
}

variable "model_par_expires" {
  type        = string
  default     = null
  description = "When the model object's pre-authenticated request stops working (RFC 3339, e.g. \"2027-06-30T00:00:00Z\"). Nodes booted from a baked image never use it (their model is in the image); nodes on the stock image fetch through it at first boot, so it must outlive the pool or be renewed (a new date makes a new request and a new instance configuration)."
  validation {
    condition     = var.model_par_expires == null || can(timeadd(coalesce(var.model_par_expires, "-"), "0s"))
    error_message = "model_par_expires must be an RFC 3339 time such as 2027-06-30T00:00:00Z."
  }
}

variable "appliance_version" {
  type        = string
  default     = "0.1.0"
  description = "gguf-appliance release the nodes install from PyPI (GGUF_APPLIANCE_PACKAGE and its pin in cloud-init.yaml). The other pins in cloud-init.yaml were resolved for the version of this checkout: deploy another version from that version's checkout."
  validation {
    condition     = can(regex("^[0-9]+(\\.[0-9]+)*((a|b|rc)[0-9]+)?(\\.post[0-9]+)?$", var.appliance_version))
    error_message = "appliance_version must be a release version such as 0.1.0."
  }
}

variable "node_ocpus" {
  type        = number
  default     = 2
  description = "OCPUs per node (VM.Standard.A2.Flex). The node decodes on every core it has."
}

variable "node_memory_gbs" {
  type        = number
  default     = 16
  description = "Memory per node in GB: the model, plus the KV cache (N_SLOTS x N_CTX tokens; 360 MB for TinyLlama at 8 x 2,048), plus the OS."
}

variable "boot_volume_gbs" {
  type        = number
  default     = 50
  description = "Boot volume per node in GB: the OS, the build tools, the venv and the model (5-6 GB in all for a 1-3 B model)."
  validation {
    condition     = var.boot_volume_gbs >= 50
    error_message = "OCI boot volumes are at least 50 GB."
  }
}

# --- the pool and its autoscaling ---

variable "pool_min_nodes" {
  type        = number
  default     = 2
  description = "Fewest nodes; also the pool's size when it is created. Two or more keep serving while one node is replaced or its fault domain fails."
  validation {
    condition     = var.pool_min_nodes >= 1
    error_message = "pool_min_nodes must be at least 1."
  }
}

variable "pool_max_nodes" {
  type        = number
  default     = 4
  description = "Most nodes autoscaling may run; bounds the bill (see the cost table in deploy/oci/README.md)."
  validation {
    condition     = var.pool_max_nodes >= var.pool_min_nodes
    error_message = "pool_max_nodes must be at least pool_min_nodes."
  }
}

variable "scale_out_busy_ratio" {
  type        = number
  default     = 0.75
  description = "Busy slots over slots, averaged over the pool's nodes for 3 minutes, above which autoscaling adds a node (so does any request waiting in a queue for 3 minutes). The nodes post it to OCI Monitoring (docs/oci-scaling.md); CPU says nothing here, a node being near 100% as soon as one stream decodes."
  validation {
    condition     = var.scale_out_busy_ratio > 0 && var.scale_out_busy_ratio <= 1
    error_message = "scale_out_busy_ratio must be in (0, 1]."
  }
}

variable "scale_in_idle_minutes" {
  type        = number
  default     = 10
  description = "Minutes with no stream in flight and no request queued on any node before autoscaling removes one: scale-in never cuts a stream short."
  validation {
    condition     = var.scale_in_idle_minutes >= 3 && var.scale_in_idle_minutes <= 60
    error_message = "scale_in_idle_minutes must be between 3 and 60."
  }
}

variable "metrics_namespace" {
  type        = string
  default     = "gguf_appliance"
  description = "OCI Monitoring namespace the nodes post their load to (GGUF_APPLIANCE_OCI_METRICS_NAMESPACE); the nodes' policy allows this namespace only."
  validation {
    condition     = can(regex("^[a-z][a-z0-9_]*$", var.metrics_namespace)) && !startswith(var.metrics_namespace, "oci_")
    error_message = "metrics_namespace must be lower-case letters, digits and _, not starting with oci_."
  }
}

variable "autoscaling_cooldown_seconds" {
  type        = number
  default     = 300
  description = "Seconds between two scaling actions (OCI's minimum is 300). A node booted from the baked image passes its health check about a minute after launch; one booting the stock image needs about 10 minutes to build llama.cpp and fetch the model."
  validation {
    condition     = var.autoscaling_cooldown_seconds >= 300
    error_message = "OCI's autoscaling cooldown is at least 300 seconds."
  }
}

# --- the load balancer ---

variable "health_check_interval_ms" {
  type        = number
  default     = 5000
  description = "Milliseconds between two health checks (GET /health/ready, expecting 200) of each node. A draining node answers 503 at once; the balancer stops sending it requests after interval x retries at most."
  validation {
    condition     = var.health_check_interval_ms >= 1000 && var.health_check_interval_ms <= 1800000
    error_message = "health_check_interval_ms must be between 1000 and 1800000."
  }
}

variable "health_check_timeout_ms" {
  type        = number
  default     = 3000
  description = "Milliseconds a health check may take. /health/ready answers from memory, even while the node streams."
  validation {
    condition     = var.health_check_timeout_ms >= 1 && var.health_check_timeout_ms < var.health_check_interval_ms
    error_message = "health_check_timeout_ms must be positive and shorter than the interval."
  }
}

variable "health_check_retries" {
  type        = number
  default     = 2
  description = "Failed (or passed) checks in a row before a node is taken out of (or put back into) rotation."
  validation {
    condition     = var.health_check_retries >= 1 && var.health_check_retries <= 10
    error_message = "health_check_retries must be between 1 and 10."
  }
}

variable "listener_idle_timeout_seconds" {
  type        = number
  default     = 300
  description = "Seconds a connection through the balancer may stay silent. Streams are never silent for long (the node sends an SSE ping every 15 s), so this bounds idle keep-alive connections; keep it under the node NGINX's keepalive_timeout (310 s) so the balancer, not NGINX, closes an idle connection."
  validation {
    condition     = var.listener_idle_timeout_seconds >= 300 && var.listener_idle_timeout_seconds < 310
    error_message = "listener_idle_timeout_seconds must be at least 300 and below 310."
  }
}

variable "lb_max_bandwidth_mbps" {
  type        = number
  default     = 10
  description = "Flexible load balancer's bandwidth ceiling in Mbps (its floor is 10). Streamed text is small: 10 Mbps carries thousands of streams."
  validation {
    condition     = var.lb_max_bandwidth_mbps >= 10 && var.lb_max_bandwidth_mbps <= 8000
    error_message = "lb_max_bandwidth_mbps must be between 10 and 8000."
  }
}

variable "client_cidrs" {
  type        = list(string)
  default     = ["0.0.0.0/0"]
  description = "Addresses allowed to reach the load balancer (all by default: a public service). Narrow it to try the pool privately."
  validation {
    condition     = alltrue([for c in var.client_cidrs : can(cidrhost(c, 0))])
    error_message = "client_cidrs must be CIDR blocks."
  }
}

variable "api_key_sha256s" {
  type        = list(string)
  default     = []
  description = "SHA-256 digests (64 hex digits) of the API keys every node accepts: `printf %s \"$KEY\" | sha256sum`. Only the digests reach the nodes (their user data and /etc/gguf-appliance/api-keys); the keys themselves never leave you. Empty: Terraform makes one key (`terraform output -raw api_key`)."
  validation {
    condition     = alltrue([for d in var.api_key_sha256s : can(regex("^[0-9a-f]{64}$", d))])
    error_message = "api_key_sha256s must be SHA-256 digests: 64 lower-case hex digits each."
  }
}

variable "api_key_secret_ocids" {
  type        = list(string)
  default     = []
  description = "OCIDs of OCI Vault secrets holding the API keys (one key, or sha256: and its digest, a line). Each node reads them as itself at start and on `systemctl reload gguf-appliance` into its root-only key file; neither the keys nor the secrets' content are in the user data or the state. Given: no key is made, and api_key_sha256s is not needed."
  validation {
    condition     = alltrue([for id in var.api_key_secret_ocids : can(regex("^ocid1\\.vaultsecret\\.[^\\s$]+$", id))])
    error_message = "api_key_secret_ocids must be Vault secret OCIDs (ocid1.vaultsecret....)."
  }
}

variable "hf_token_secret_ocid" {
  type        = string
  default     = null
  description = "OCID of an OCI Vault secret holding a Hugging Face token, for a gated model: read by each node into /etc/gguf-appliance/hf-token (root only)."
  validation {
    condition     = var.hf_token_secret_ocid == null || can(regex("^ocid1\\.vaultsecret\\.[^\\s$]+$", var.hf_token_secret_ocid))
    error_message = "hf_token_secret_ocid must be a Vault secret OCID (ocid1.vaultsecret....)."
  }
}

variable "certificate_ocid" {
  type        = string
  default     = null
  description = "OCID of a certificate in OCI's Certificates service. When given, the balancer serves HTTPS on port 443 with it, and its port 80 only redirects there."
}

# --- the network ---

variable "vcn_cidr" {
  type        = string
  default     = "10.0.0.0/16"
  description = "Address range of the pool's VCN."
  validation {
    condition     = can(cidrhost(var.vcn_cidr, 0))
    error_message = "vcn_cidr must be a CIDR block."
  }
}

variable "lb_subnet_cidr" {
  type        = string
  default     = "10.0.1.0/24"
  description = "Public subnet of the load balancer, inside vcn_cidr. The nodes trust X-Forwarded-For from this range only."
  validation {
    condition     = can(cidrhost(var.lb_subnet_cidr, 0))
    error_message = "lb_subnet_cidr must be a CIDR block."
  }
}

variable "nodes_subnet_cidr" {
  type        = string
  default     = "10.0.2.0/24"
  description = "Private subnet of the nodes, inside vcn_cidr: no public addresses; out to the internet through a NAT gateway."
  validation {
    condition     = can(cidrhost(var.nodes_subnet_cidr, 0))
    error_message = "nodes_subnet_cidr must be a CIDR block."
  }
}

variable "availability_domain_number" {
  type        = number
  default     = 1
  description = "Which availability domain of the region (1, 2 or 3) holds the pool; the nodes spread over its three fault domains."
}
