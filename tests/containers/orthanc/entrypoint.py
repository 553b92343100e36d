"""Orthanc stand-in: write its configuration from ORTHANC__SECTION__KEY variables, as the orthancteam/orthanc image does, and run it."""
import json
import os

def camel(name):
    special = {"DICOM_WEB": "DicomWeb"}
    return special.get(name) or "".join(p[:1] + p[1:].lower() for p in name.split("_"))

conf = {
    "Name": "orthanc", "StorageDirectory": "/var/lib/orthanc/db", "IndexDirectory": "/var/lib/orthanc/db",
    "HttpPort": 8042, "DicomPort": 4242, "RemoteAccessAllowed": True,
    "Plugins": ["/usr/share/orthanc/plugins"],
}
for key, value in os.environ.items():
    if not key.startswith("ORTHANC__"):
        continue
    try:
        value = json.loads(value)
    except ValueError:
        pass
    parts = [camel(p) for p in key[len("ORTHANC__"):].split("__")]
    node = conf
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
os.makedirs("/etc/orthanc-env", exist_ok=True)
with open("/etc/orthanc-env/orthanc.json", "w") as f:
    json.dump(conf, f, indent=1)
os.execvp("Orthanc", ["Orthanc", "/etc/orthanc-env/orthanc.json"])
