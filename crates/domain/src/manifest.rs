pub struct Manifest; pub struct ManifestError;
