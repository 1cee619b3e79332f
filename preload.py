# Executed by the WebUI before its settings exist: only add command-line flags here.


def preload(parser):
    parser.add_argument(
        "--identity-models-dir",
        type=str,
        default=None,
        help="sd-webui-identity: an extra folder searched first for IP-Adapter, InstantID, PhotoMaker and CLIP-vision files",
    )
