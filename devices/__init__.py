"""edge_ssl.devices: Jetson profiles and detection, targets, deploy and the on-device agent."""
