// A plain Java 17 HttpClient with the PKCS#12 keystore and truststore that
// `trustmesh agent --pkcs12 ... --truststore ...` keeps fresh: standard JSSE only.
// It builds a new SSLContext (and HttpClient) whenever the agent has rewritten either
// store, so calls after a renewal present the new certificate.
// Usage: java ReloadingClient.java URL KEYSTORE TRUSTSTORE PASSWORD_FILE
// Makes one GET per line read from stdin and prints "STATUS BODY" for each.
import java.io.BufferedReader;
import java.io.ByteArrayInputStream;
import java.io.InputStreamReader;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyStore;
import java.util.Arrays;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManagerFactory;

public class ReloadingClient {
    /** The agent's stores, loaded again whenever their bytes change on disk. */
    static final class TrustmeshCredentials {
        private final Path keystore;
        private final Path truststore;
        private final char[] password;
        private byte[] keystoreBytes = new byte[0];
        private byte[] truststoreBytes = new byte[0];
        private HttpClient client;

        TrustmeshCredentials(Path keystore, Path truststore, Path passwordFile) throws Exception {
            this.keystore = keystore;
            this.truststore = truststore;
            this.password = Files.readString(passwordFile).strip().toCharArray();
        }

        /** An HttpClient with the current certificate (the agent renames new files into place). */
        synchronized HttpClient client() throws Exception {
            byte[] keys = Files.readAllBytes(keystore);
            byte[] trust = Files.readAllBytes(truststore);
            if (client == null || !Arrays.equals(keys, keystoreBytes) || !Arrays.equals(trust, truststoreBytes)) {
                KeyStore keyStore = KeyStore.getInstance("PKCS12");
                keyStore.load(new ByteArrayInputStream(keys), password);
                KeyStore trustStore = KeyStore.getInstance("PKCS12");
                trustStore.load(new ByteArrayInputStream(trust), password);
                KeyManagerFactory kmf = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
                kmf.init(keyStore, password);
                TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
                tmf.init(trustStore);
                SSLContext context = SSLContext.getInstance("TLS");
                context.init(kmf.getKeyManagers(), tmf.getTrustManagers(), null);
                client = HttpClient.newBuilder().sslContext(context).build();
                keystoreBytes = keys;
                truststoreBytes = trust;
            }
            return client;
        }
    }

    public static void main(String[] args) throws Exception {
        TrustmeshCredentials credentials =
                new TrustmeshCredentials(Path.of(args[1]), Path.of(args[2]), Path.of(args[3]));
        HttpRequest request = HttpRequest.newBuilder(URI.create(args[0])).GET().build();
        BufferedReader stdin = new BufferedReader(new InputStreamReader(System.in));
        while (stdin.readLine() != null) {
            HttpResponse<String> response =
                    credentials.client().send(request, HttpResponse.BodyHandlers.ofString());
            System.out.println(response.statusCode() + " " + response.body());
            System.out.flush();
        }
    }
}
