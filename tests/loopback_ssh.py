"""An SSH server on this machine's loopback, for the tests of a launch across nodes: `colossalai run` reaches every
host of a hostfile but this one over SSH (Fabric), and this server plays such a host. It accepts one client key and
runs each command it is sent in bash, in this machine's environment, as a node's sshd would."""
import socket
import subprocess
import threading

import paramiko


class CommandServer(paramiko.ServerInterface):
    def __init__(self, client_key, commands, env):
        self.client_key, self.commands, self.env = client_key, commands, env

    def check_channel_request(self, kind, channel_id):
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_publickey(self, username, key):
        return paramiko.AUTH_SUCCESSFUL if key == self.client_key else paramiko.AUTH_FAILED

    def check_channel_exec_request(self, channel, command):
        self.commands.append(command.decode())
        threading.Thread(target=run_command, args=(channel, command.decode(), self.env), daemon=True).start()
        return True


def run_command(channel, command, env):
    """Runs `command` in `env`, passing its stdout and stderr back as they come, then its exit status."""
    process = subprocess.Popen(["bash", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    pumps = [threading.Thread(target=pump, args=(stream, send)) for stream, send in
             ((process.stdout, channel.sendall), (process.stderr, channel.sendall_stderr))]
    for thread in pumps:
        thread.start()
    for thread in pumps:
        thread.join()
    channel.send_exit_status(process.wait())
    channel.close()


def pump(stream, send):
    while chunk := stream.read1(1 << 16):
        send(chunk)


def start(host, folder, env):
    """Serves, in a daemon thread, as `host` (an address that is not this machine's own name, such as 127.0.0.2,
    which colossalai run therefore reaches over SSH), running commands in `env`, that node's environment. Writes
    into `folder` the client key and an ssh config that sends `host` to the server's port on 127.0.0.1, for a client
    whose HOME is `folder`. Returns the list that the commands it is sent are added to."""
    commands = []
    host_key, client_key = paramiko.RSAKey.generate(2048), paramiko.RSAKey.generate(2048)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve():
        while True:
            connection, _ = listener.accept()
            transport = paramiko.Transport(connection)
            transport.add_server_key(host_key)
            transport.start_server(server=CommandServer(client_key, commands, env))

    threading.Thread(target=serve, daemon=True).start()
    ssh = folder / ".ssh"
    ssh.mkdir(parents=True)
    client_key.write_private_key_file(str(ssh / "id_rsa"))
    (ssh / "config").write_text(f"Host {host}\n  HostName 127.0.0.1\n  Port {listener.getsockname()[1]}\n"
                                f"  IdentityFile {ssh / 'id_rsa'}\n  ConnectTimeout 30\n")
    return commands
